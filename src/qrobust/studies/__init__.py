"""The papers' experiments as functions over the flow data → model → quantize → fit → evaluate."""

import dataclasses
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, TypeVar

T = TypeVar("T")

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


def override_budget(base: T, overrides: Mapping[str, Any] | None) -> T:
    """``base`` (a study's attack/timing budget dataclass) with the fields in ``overrides`` replaced.

    Unknown names and values of the wrong kind raise :class:`~qrobust.errors.ConfigError` naming them, so
    that ``--budget '{"square_querie": 300}'`` fails before hours of training rather than being ignored.
    """
    from qrobust.errors import ConfigError

    if not overrides:
        return base
    if not isinstance(overrides, Mapping):
        raise ConfigError(f"budget must be a mapping of field names to values, got {type(overrides).__name__}")
    fields = {f.name: f for f in dataclasses.fields(base)}  # type: ignore[arg-type]
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise ConfigError(f"unknown budget fields {unknown}; known: {sorted(fields)}")
    for k, v in overrides.items():
        current = getattr(base, k)
        if v is None and fields[k].default is None:  # a field whose default "None" means "no limit"
            continue
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"budget field {k} must be a positive integer, got {v!r} (default {current!r})")
    return dataclasses.replace(base, **overrides)  # type: ignore[type-var]
