"""The package version, in one place (read by ``qrobust.__version__`` and written into checkpoints)."""

__version__ = "0.1.0"
