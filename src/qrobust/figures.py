"""Figures without pyplot: a matplotlib Figure on its own Agg canvas (no global backend change, works without a
display, nothing to close) and its atomic PNG write. Every room's plots use these two."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from qrobust.utils import atomic_write

__all__ = ["new_figure", "save_figure"]


def new_figure(figsize: tuple[float, float]) -> Any:
    """A matplotlib Figure on its own Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # deferred: matplotlib is slow to import
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Any, path: str | os.PathLike, dpi: int = 120) -> Path:
    """Write ``fig`` (from :func:`new_figure`) as a PNG at ``path`` atomically; returns the path."""
    return atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight"))
