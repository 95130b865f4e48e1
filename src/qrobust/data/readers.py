"""Readers for the on-disk formats: they turn files into validated uint8 N×C×H×W arrays and int64 labels.

Every reader raises :class:`~qrobust.errors.DataError` naming the file when the bytes are not what the
format promises (bad magic number, truncated stream, counts that disagree, labels out of range).
"""

from __future__ import annotations

import gzip
import io
import logging
import multiprocessing
import os
import pickle
import tarfile
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path, PurePosixPath

import numpy as np

from qrobust.errors import DataError

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------- idx (MNIST)

_IDX_DTYPES = {
    0x08: np.uint8,
    0x09: np.int8,
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_bytes(path: Path) -> bytes:
    """The (gunzipped, if the name ends in .gz) content of a file; a broken gzip stream is a DataError."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(
            f"{path} is unreadable or corrupt ({type(e).__name__}: {e}); delete it and download "
            "it again (--download) or point --data-dir at a good copy"
        ) from e


def read_idx(path: Path) -> np.ndarray:
    """Parse an idx file (the MNIST format): magic ``00 00 <type> <ndim>``, big-endian uint32 sizes, data."""
    raw = read_bytes(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES or not 1 <= raw[3] <= 4:
        raise DataError(
            f"{path} is not an idx file (magic bytes {raw[:4].hex() or 'missing'}); "
            "expected an MNIST-format file such as train-images-idx3-ubyte.gz"
        )
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path} is truncated inside its header; download it again")
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(
            f"{path}: header promises {dims} values ({expected} bytes) but the file holds "
            f"{len(raw) - header} bytes; it is truncated or corrupt - download it again"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)


def read_mnist_pair(
    images_path: Path, labels_path: Path, *, num_classes: int = 10
) -> tuple[np.ndarray, np.ndarray]:
    """An idx3 image file and its idx1 label file → (uint8 N×1×28×28, int64 N), cross-checked."""
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.dtype != np.uint8 or images.ndim != 3:
        raise DataError(
            f"{images_path}: expected uint8 images of shape (N, 28, 28), got {images.dtype} "
            f"{images.shape} - is this an image file?"
        )
    if images.shape[1:] != (28, 28):
        raise DataError(f"{images_path}: images are {images.shape[1]}x{images.shape[2]}, expected 28x28")
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise DataError(
            f"{labels_path}: expected a uint8 label vector, got {labels.dtype} {labels.shape} - "
            "is this a label file?"
        )
    if labels.shape[0] != images.shape[0]:
        raise DataError(
            f"{images_path} holds {images.shape[0]} images but {labels_path} holds "
            f"{labels.shape[0]} labels; one of them is from another set or truncated"
        )
    if labels.size and labels.max() >= num_classes:
        raise DataError(f"{labels_path}: label {int(labels.max())} is outside 0..{num_classes - 1}")
    return images[:, None, :, :].copy(), labels.astype(np.int64)


# ------------------------------------------------------------------------------- CIFAR-10 python batches

CIFAR_BATCHES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
_CIFAR_BATCH_NAMES = frozenset(n for names in CIFAR_BATCHES.values() for n in names)
# The only globals an official CIFAR batch pickle refers to (NumPy array reconstruction).
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles plain containers and NumPy arrays; refuses every other global (no code execution)."""

    def find_class(self, module: str, name: str):  # noqa: ANN201 - pickle API
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR batch")
        if module.startswith("numpy.core") and hasattr(np, "_core"):
            module = module.replace("numpy.core", "numpy._core", 1)
        return super().find_class(module, name)


def read_cifar_batch(path: Path | str, data: bytes | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One official CIFAR-10 python batch (``data_batch_N``/``test_batch``) → (uint8 N×3×32×32, int64 N).

    ``data``: the file's bytes when it comes from an archive (``path`` then only names it). The official
    files are Python pickles; they are read with ``encoding="bytes"`` through an unpickler that admits only
    NumPy array reconstruction, and only for the official file names.
    """
    base = PurePosixPath(str(path)).name
    if base not in _CIFAR_BATCH_NAMES:
        raise DataError(
            f"refusing to unpickle {path}: only the official CIFAR-10 batch files "
            f"({', '.join(sorted(_CIFAR_BATCH_NAMES))}) are read"
        )
    try:
        with io.BytesIO(data) if data is not None else open(path, "rb") as f:
            obj = _NumpyOnlyUnpickler(f, encoding="bytes").load()
    except Exception as e:  # any failure inside unpickling means the file is not a CIFAR batch
        raise DataError(
            f"{path} is not a readable CIFAR-10 python batch ({type(e).__name__}: {e}); "
            "download cifar-10-python.tar.gz again (--download)"
        ) from e
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a dict with b'data' and b'labels', got {type(obj).__name__}")
    pixels = obj.get(b"data", obj.get("data"))
    labels = obj.get(b"labels", obj.get("labels"))
    if pixels is None or labels is None:
        raise DataError(f"{path}: the batch lacks 'data' or 'labels' (keys: {sorted(map(str, obj))})")
    if isinstance(pixels, bytes | bytearray):
        pixels = np.frombuffer(pixels, dtype=np.uint8)
    pixels = np.asarray(pixels)
    labels = np.asarray(labels)
    if pixels.dtype != np.uint8 or pixels.size % 3072 or labels.ndim != 1:
        raise DataError(
            f"{path}: data must be uint8 rows of 3072 bytes (got {pixels.dtype}, {pixels.shape}) "
            f"and labels a vector (got {labels.shape})"
        )
    images = pixels.reshape(-1, 3, 32, 32)
    if images.shape[0] != labels.shape[0]:
        raise DataError(f"{path}: {images.shape[0]} images but {labels.shape[0]} labels")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise DataError(f"{path}: labels outside 0..9")
    return images.copy(), labels.astype(np.int64)


def read_cifar_python(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """The batches of a ``cifar-10-batches-py`` folder for one split."""
    parts = [read_cifar_batch(folder / name) for name in CIFAR_BATCHES[split]]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def cifar_batches_in(members: dict[str, bytes], split: str) -> list[tuple[str, bytes]] | None:
    """The official batches of ``split`` among archive members (all of one folder), or None if absent."""
    by_folder: dict[str, dict[str, bytes]] = {}
    for name, data in members.items():
        p = PurePosixPath(name)
        if p.name in _CIFAR_BATCH_NAMES:
            by_folder.setdefault(str(p.parent), {})[p.name] = data
    for folder, found in sorted(by_folder.items()):
        if _CIFAR_BATCH_NAMES <= set(found):
            return [(f"{folder}/{n}", found[n]) for n in CIFAR_BATCHES[split]]
    return None


# ------------------------------------------------------------------------------------------- SVHN (.mat)


def read_svhn_mat(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Official SVHN cropped digits (``train_32x32.mat``/``test_32x32.mat``): X is 32×32×3×N, label 10 = 0."""
    import scipy.io

    try:
        mat = scipy.io.loadmat(path, variable_names=["X", "y"])
    except Exception as e:  # scipy raises ValueError/MatReadError/OSError on broken files
        raise DataError(
            f"{path} is not a readable MATLAB file ({type(e).__name__}: {e}); download it again (--download)"
        ) from e
    x, y = mat.get("X"), mat.get("y")
    if x is None or y is None:
        raise DataError(f"{path}: expected variables X and y (the official SVHN 32x32 format)")
    if x.ndim != 4 or x.shape[:3] != (32, 32, 3):
        raise DataError(f"{path}: X has shape {x.shape}, expected (32, 32, 3, N)")
    y = np.asarray(y).reshape(-1)
    if y.shape[0] != x.shape[3]:
        raise DataError(f"{path}: {x.shape[3]} images but {y.shape[0]} labels")
    if y.size and (y.min() < 1 or y.max() > 10):
        raise DataError(
            f"{path}: SVHN labels must lie in 1..10 (10 meaning digit 0), got {int(y.min())}..{int(y.max())}"
        )
    if x.dtype != np.uint8:
        if x.size and (x.min() < 0 or x.max() > 255):
            raise DataError(f"{path}: pixel values outside 0..255")
        x = x.astype(np.uint8)
    images = np.ascontiguousarray(x.transpose(3, 2, 0, 1))
    return images, (y.astype(np.int64) % 10)


# ------------------------------------------------------------------------------------------ image folder

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
_GRAY_MODES = {"1", "L", "I", "I;16", "F"}
#: Below this many images a process pool costs more than it saves.
PARALLEL_MIN_IMAGES = 4096

#: An image to decode: a file path, or (name, bytes) for an archive member.
ImageItem = str | tuple[str, bytes]


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not PurePosixPath(name).name.startswith(".")


def list_image_folder(split_dir: Path, classes: Sequence[str]) -> tuple[list[ImageItem], np.ndarray]:
    """Files of each class folder (sorted by name), classes in the given order → (paths, labels)."""
    paths: list[ImageItem] = []
    labels: list[int] = []
    for label, cls in enumerate(classes):
        d = split_dir / cls
        if not d.is_dir():
            continue
        with os.scandir(d) as it:
            names = sorted(e.name for e in it if e.is_file() and _is_image(e.name))
        paths.extend(os.path.join(d, n) for n in names)
        labels.extend([label] * len(names))
    return paths, np.asarray(labels, dtype=np.int64)


def _open_image(item: ImageItem):  # noqa: ANN202 - a PIL image
    from PIL import Image

    return Image.open(io.BytesIO(item[1])) if isinstance(item, tuple) else Image.open(item)


def _item_name(item: ImageItem) -> str:
    return item[0] if isinstance(item, tuple) else item


def _decode_chunk(args: tuple[list[ImageItem], str, tuple[int, int]]) -> np.ndarray:
    """Decode images to one uint8 (k, H, W, C) array; module-level so a process pool can run it."""
    items, mode, size = args
    channels = 1 if mode == "L" else 3
    out = np.empty((len(items), size[1], size[0], channels), dtype=np.uint8)
    for i, item in enumerate(items):
        try:
            with _open_image(item) as im:
                if im.size != size:
                    raise ValueError(f"image is {im.size[0]}x{im.size[1]}, the first is {size[0]}x{size[1]}")
                arr = np.asarray(im.convert(mode) if im.mode != mode else im)
        except Exception as e:  # PIL raises many types for broken files
            raise DataError(
                f"cannot decode {_item_name(item)} ({type(e).__name__}: {e}); every image of a folder "
                "dataset must be a readable image of the same size - remove or fix it"
            ) from e
        out[i] = arr.reshape(size[1], size[0], channels)
    return out


def decode_images(
    items: Sequence[ImageItem], *, mode: str | None = None, workers: int = 1, chunk: int = 1024
) -> np.ndarray:
    """Decode images (paths or (name, bytes)) to uint8 N×C×H×W.

    ``mode``: ``"L"`` (1 channel) or ``"RGB"`` (3); by default the first image decides. All images must
    share the first image's size. ``workers > 1`` decodes chunks in a process pool (fork) when there are at
    least :data:`PARALLEL_MIN_IMAGES` images.
    """
    if not items:
        raise DataError("no images to decode")
    try:
        with _open_image(items[0]) as first:
            size = first.size
            if mode is None:
                mode = "L" if first.mode in _GRAY_MODES else "RGB"
    except Exception as e:
        raise DataError(f"cannot decode {_item_name(items[0])} ({type(e).__name__}: {e})") from e
    jobs = [(list(items[i : i + chunk]), mode, size) for i in range(0, len(items), chunk)]
    parallel = workers > 1 and len(items) >= PARALLEL_MIN_IMAGES
    parts = None
    if parallel and "fork" in multiprocessing.get_all_start_methods():
        try:
            with multiprocessing.get_context("fork").Pool(workers) as pool:
                parts = pool.map(_decode_chunk, jobs, chunksize=1)
        except (AssertionError, OSError) as e:  # e.g. inside a daemonic worker, or out of processes
            log.info("decoding in this process: no process pool (%s)", e)
    if parts is None:
        parts = [_decode_chunk(j) for j in jobs]
    return np.ascontiguousarray(np.concatenate(parts).transpose(0, 3, 1, 2))


# ---------------------------------------------------------------------------------------- digits (sklearn)

DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0


def read_digits(split: str) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 8×8 digits, pixels 0..16 scaled to 0..255, split 80/20 stratified (seed 0)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = np.rint(np.asarray(bunch.images, dtype=np.float64) * (255.0 / 16.0)).astype(np.uint8)
    y = np.asarray(bunch.target, dtype=np.int64)
    rng = np.random.default_rng(DIGITS_SPLIT_SEED)
    test = np.zeros(len(y), dtype=bool)
    for cls in np.unique(y):
        members = np.flatnonzero(y == cls)
        k = int(round(DIGITS_TEST_FRACTION * len(members)))
        test[rng.permutation(members)[:k]] = True
    keep = test if split == "test" else ~test
    return x[keep][:, None, :, :].copy(), y[keep]


# ------------------------------------------------------------------------------------------- archives


def _check_member(member: tarfile.TarInfo, archive: Path) -> None:
    name = member.name
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if name.startswith(("/", "\\")) or (parts and ":" in parts[0]):
        raise DataError(f"{archive}: member {name!r} has an absolute path; refusing to read this archive")
    if ".." in parts:
        raise DataError(f"{archive}: member {name!r} points outside the archive ('..'); refusing to read it")
    if not (member.isfile() or member.isdir()):
        raise DataError(
            f"{archive}: member {name!r} is a link or special file; refusing to read this archive"
        )


def read_tar(archive: Path, *, keep: Callable[[str], bool]) -> dict[str, bytes]:
    """Read an archive (.tar, .tar.gz, ...) in one streaming pass, never writing to disk.

    Every member is checked first: an absolute path, a ``..`` component, a link or a special file makes the
    whole archive a DataError. Returns {member name: bytes} of the regular files for which ``keep(name)``.
    """
    out: dict[str, bytes] = {}
    try:
        with tarfile.open(archive, "r|*") as tar:
            for member in tar:
                _check_member(member, archive)
                if member.isfile() and keep(member.name):
                    f = tar.extractfile(member)
                    if f is not None:
                        out[member.name] = f.read()
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise DataError(
            f"{archive} is not a readable tar archive ({type(e).__name__}: {e}); download it again"
        ) from e
    return out


def archive_image_folder(
    members: dict[str, bytes], split: str
) -> tuple[list[ImageItem], np.ndarray, list[str]]:
    """The image-folder tree inside an archive → (items sorted by class then name, labels, classes).

    With ``<prefix>/train|test/<class>/<file>`` members the split's folder is used and the classes are the
    union over both splits; otherwise ``<prefix>/<class>/<file>`` serves as the only split.
    """
    images = [PurePosixPath(n) for n in members if _is_image(n)]
    split_layout = [p for p in images if len(p.parts) >= 3 and p.parts[-3] in ("train", "test")]
    if split_layout:
        roots = {p.parts[:-3] for p in split_layout}
        if len(roots) > 1:
            raise DataError(f"the archive holds several train/test trees ({sorted(map('/'.join, roots))})")
        classes = sorted({p.parts[-2] for p in split_layout})
        chosen = [p for p in split_layout if p.parts[-3] == split]
        if not chosen:
            raise DataError(f"the archive has train/test folders but no images under {split}/")
    else:
        chosen = [p for p in images if len(p.parts) >= 2]
        roots = {p.parts[:-2] for p in chosen}
        if len(roots) > 1:
            raise DataError(f"the archive holds images at several depths ({sorted(map('/'.join, roots))})")
        classes = sorted({p.parts[-2] for p in chosen})
    if not chosen:
        raise DataError(f"the archive holds no images in class folders ({', '.join(IMAGE_EXTENSIONS)})")
    index = {c: i for i, c in enumerate(classes)}
    chosen.sort(key=lambda p: (index[p.parts[-2]], p.name))
    items: list[ImageItem] = [(str(p), members[str(p)]) for p in chosen]
    labels = np.asarray([index[p.parts[-2]] for p in chosen], dtype=np.int64)
    return items, labels, classes
