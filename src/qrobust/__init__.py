"""qrobust: build and verify adversarially robust quantized neural networks."""

from qrobust.errors import CheckpointError, ConfigError, DataError, InputError, QrobustError

__version__ = "0.1.0"

__all__ = ["CheckpointError", "ConfigError", "DataError", "InputError", "QrobustError", "__version__"]
