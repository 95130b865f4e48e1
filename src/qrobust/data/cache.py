"""The decoded-array cache: one uncompressed ``.npz`` per (dataset, split, source), written atomically.

A cache file's name carries a key computed from the dataset name, the split, the source's resolved path and
the size and mtime of every source file, so editing, replacing or moving the source makes a new key and the
old file is never read again (it is deleted when its replacement is written).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import zipfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from qrobust.utils import atomic_write

log = logging.getLogger(__name__)

CACHE_ENV = "QROBUST_CACHE"
#: Bump when the decoded layout changes, so that every old cache file is ignored.
CACHE_VERSION = 1


def default_cache_dir() -> Path:
    """``$QROBUST_CACHE`` if set, else ``~/.cache/qrobust``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "qrobust"


def resolve_cache_dir(cache_dir: str | os.PathLike | None) -> Path:
    return default_cache_dir() if cache_dir is None else Path(cache_dir).expanduser()


def file_stats(paths: Iterable[Path], base: Path | None = None) -> list[tuple[str, int, int]]:
    """(name relative to ``base``, size, mtime in ns) for each path: the part of a cache key that changes
    whenever a source file is rewritten."""
    out = []
    for p in paths:
        st = os.stat(p)
        name = os.path.relpath(p, base) if base is not None else str(p)
        out.append((name, st.st_size, st.st_mtime_ns))
    return out


def tree_stats(root: Path) -> list[tuple[str, int, int]]:
    """:func:`file_stats` of every file under ``root`` (sorted), via ``os.scandir`` (fast for 60k files)."""
    out: list[tuple[str, int, int]] = []
    stack = [root]
    while stack:
        d = stack.pop()
        with os.scandir(d) as it:
            for e in it:
                if e.is_dir(follow_symlinks=False):
                    stack.append(Path(e.path))
                elif e.is_file():
                    st = e.stat()
                    out.append((os.path.relpath(e.path, root), st.st_size, st.st_mtime_ns))
    out.sort()
    return out


def make_key(**parts: object) -> str:
    """A short hex digest of JSON-serialisable parts (plus the cache version)."""
    blob = json.dumps({"v": CACHE_VERSION, **parts}, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


def cache_file(cache_dir: Path, name: str, split: str, source_path: str, key: str) -> Path:
    """``<cache_dir>/arrays/<name>-<split>-<hash of source path>-<key>.npz``."""
    where = hashlib.sha256(source_path.encode()).hexdigest()[:8]
    return cache_dir / "arrays" / f"{name}-{split}-{where}-{key}.npz"


def load_arrays(path: Path) -> dict[str, np.ndarray] | None:
    """The arrays of a cache file; ``None`` if it is absent or unreadable (an unreadable one is removed)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        log.warning("ignoring unreadable cache file %s (%s); it will be rebuilt", path, e)
        with contextlib.suppress(OSError):
            path.unlink()
        return None


def save_arrays(path: Path, arrays: dict[str, np.ndarray]) -> bool:
    """Write ``arrays`` to ``path`` atomically (temp file in the same folder, then rename).

    Stale siblings for the same dataset, split and source path are removed. Returns False (with a warning)
    if the cache folder is not writable: caching is an optimisation, never a reason to fail.
    """
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    try:
        atomic_write(path, write)
    except OSError as e:
        log.warning(
            "could not write cache file %s (%s); set QROBUST_CACHE or cache_dir to a writable folder", path, e
        )
        return False
    prefix = path.name.rsplit("-", 1)[0] + "-"
    for old in path.parent.glob(prefix + "*.npz"):
        if old != path:
            with contextlib.suppress(OSError):
                old.unlink()
                log.debug("removed stale cache file %s", old)
    return True
