"""The papers' experiments as functions over the flow data → model → quantize → fit → evaluate."""

from collections.abc import Iterator
from contextlib import contextmanager

#: datasets whose small images leave torch's intra-op parallelism little to split: studies on them run on one
#: thread ("auto"), which on a shared two-core machine was 3–6× faster than two
SMALL_IMAGE_DATASETS = ("digits", "mnist", "fashion-mnist")


@contextmanager
def study_threads(threads: int | str | None, dataset: str) -> Iterator[int]:
    """Run a study with torch's intra-op threads set (restored afterwards); yields the count in force.

    ``"auto"`` means 1 thread on :data:`SMALL_IMAGE_DATASETS` and the current setting elsewhere; None keeps
    the current setting.
    """
    import torch

    from qrobust.errors import ConfigError

    if threads == "auto":
        threads = 1 if dataset in SMALL_IMAGE_DATASETS else None
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ConfigError(f"threads must be a positive integer, 'auto' or None, got {threads!r}")
    old = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(old)
