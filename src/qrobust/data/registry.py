"""The dataset registry: names → static info, where to look on disk, how to decode, and the cache.

``load_dataset`` resolves a name and split to a *source* (a folder of idx files, CIFAR python batches, an
image-folder tree, a ``.mat`` file or a tar archive of one of these), returns the cached decoded arrays when
the source has not changed, and otherwise decodes, validates and caches them.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from qrobust.data import cache as _cache
from qrobust.data import readers
from qrobust.data.dataset import ArrayDataset, DatasetInfo
from qrobust.data.download import fetch_dataset
from qrobust.errors import ConfigError, DataError

log = logging.getLogger(__name__)

SPLITS = ("train", "test")
DATA_ENV = "QROBUST_DATA"
WORKERS_ENV = "QROBUST_DECODE_WORKERS"

DIGIT_CLASSES = [str(i) for i in range(10)]
FASHION_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

# digits: mean/std of the train split (qrobust's fixed 80/20 split) on the [0, 1] scale.
_INFO: dict[str, DatasetInfo] = {
    "digits": DatasetInfo(
        "digits", 10, (1, 8, 8), (0.3055,), (0.3759,), DIGIT_CLASSES, "scikit-learn digits (8x8)"
    ),
    "mnist": DatasetInfo("mnist", 10, (1, 28, 28), (0.1307,), (0.3081,), DIGIT_CLASSES, "MNIST"),
    "fashion-mnist": DatasetInfo(
        "fashion-mnist", 10, (1, 28, 28), (0.2860,), (0.3530,), FASHION_CLASSES, "Fashion-MNIST"
    ),
    "cifar10": DatasetInfo(
        "cifar10",
        10,
        (3, 32, 32),
        (0.4914, 0.4822, 0.4465),
        (0.2470, 0.2435, 0.2616),
        CIFAR10_CLASSES,
        "CIFAR-10",
    ),
    "svhn": DatasetInfo(
        "svhn", 10, (3, 32, 32), (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970), DIGIT_CLASSES, "SVHN"
    ),
    "imagefolder": DatasetInfo("imagefolder", None, None, None, None, None, "image folder"),
}

_ALIASES = {"cifar-10": "cifar10", "fashionmnist": "fashion-mnist", "image-folder": "imagefolder"}

_IDX_STEMS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

# Sub-paths of a data folder (``$QROBUST_DATA``, ``./data``, ``../shared/data``) that may hold a dataset.
_SUBPATHS = {
    "mnist": ("mnist", "MNIST/raw"),
    "fashion-mnist": ("fashion-mnist", "FashionMNIST/raw"),
    "cifar10": (
        "cifar10",
        "cifar-10-batches-py",
        "cifar-10-python.tar.gz",
        "cifar10-jpeg",
        "cifar10-jpeg.tar.gz",
    ),
    "svhn": ("svhn",),
    "imagefolder": (),
}
_CIFAR_CHILDREN = (
    "cifar-10-batches-py",
    "cifar-10-python.tar.gz",
    "cifar10-jpeg",
    "cifar10-jpeg.tar.gz",
    "cifar10",
    "cifar-10",
)
_SYSTEM_DIRS = {"fashion-mnist": (Path("/usr/share/datasets/fashion-mnist"),)}

_EXPECTED = {
    "mnist": "the four idx files train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
    "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz (uncompressed variants accepted)",
    "cifar10": "the official python batches (cifar-10-batches-py/ with data_batch_1..5 and test_batch, or "
    "cifar-10-python.tar.gz), or an image-folder tree cifar10-jpeg/{train,test}/<class>/*.jpg "
    "(or its .tar.gz)",
    "svhn": "the official files train_32x32.mat and test_32x32.mat",
    "imagefolder": "a class-per-folder tree (root/<class>/*.png, or root/train/<class>/... and "
    "root/test/<class>/...)",
}
_EXPECTED["fashion-mnist"] = _EXPECTED["mnist"]

_TAR_SUFFIXES = (".tar.gz", ".tgz", ".tar")


def available_datasets() -> list[str]:
    """The registered dataset names."""
    return list(_INFO)


def _canonical(name: str) -> str:
    if not isinstance(name, str):
        raise ConfigError(f"dataset name must be a string, got {name!r}")
    key = name.strip().lower().replace("_", "-")
    key = _ALIASES.get(key, key)
    if key not in _INFO:
        raise ConfigError(f"unknown dataset {name!r}; available: {', '.join(available_datasets())}")
    return key


def _static_info(name: str) -> DatasetInfo:
    info = _INFO[name]  # a copy, so that nobody can edit the registry's class list through a dataset
    return info if info.classes is None else replace(info, classes=list(info.classes))


def dataset_info(name: str) -> DatasetInfo:
    """Static info of a registered dataset, without loading it (``imagefolder``: all unknown → None)."""
    return _static_info(_canonical(name))


# ------------------------------------------------------------------------------------------------ sources


@dataclass
class _Source:
    kind: str  # "idx" | "cifar-python" | "imagefolder" | "svhn-mat" | "tarball"
    path: Path  # the folder or file the data was found at
    files: list[Path] = field(default_factory=list)  # exact files (idx, cifar-python, svhn-mat, tarball)
    split_dir: Path | None = None  # imagefolder: the folder of class folders for this split
    classes: list[str] | None = None  # imagefolder: class names, index = label

    def key(self, name: str, split: str) -> str:
        if self.kind == "imagefolder":
            assert self.split_dir is not None
            stats = _cache.tree_stats(self.split_dir)
        else:
            stats = _cache.file_stats(self.files, base=self.path if self.path.is_dir() else self.path.parent)
        return _cache.make_key(
            name=name,
            split=split,
            kind=self.kind,
            path=str(self.path.resolve()),
            stats=stats,
            classes=self.classes,
        )


def _is_tar(p: Path) -> bool:
    return p.is_file() and p.name.lower().endswith(_TAR_SUFFIXES)


def _resolve_idx(p: Path, split: str) -> _Source | str:
    if not p.is_dir():
        return "not found" if not p.exists() else "not a folder"
    found = []
    for stem in _IDX_STEMS[split]:
        dotted = stem.replace("-idx", ".idx")
        variants = [stem + ".gz", stem, dotted + ".gz", dotted]
        hit = next((p / v for v in variants if (p / v).is_file()), None)
        if hit is None:
            return f"folder exists but lacks {stem}[.gz]"
        found.append(hit)
    return _Source("idx", p, files=found)


def _resolve_cifar(p: Path, split: str, *, depth: int = 1) -> _Source | str:
    if _is_tar(p):
        return _Source("tarball", p, files=[p])
    if not p.is_dir():
        return "not found" if not p.exists() else "neither a folder nor a .tar(.gz) archive"
    batches = [p / n for names in readers.CIFAR_BATCHES.values() for n in names]
    if all(b.is_file() for b in batches):
        return _Source("cifar-python", p, files=[p / n for n in readers.CIFAR_BATCHES[split]])
    if (p / "train").is_dir() or (p / "test").is_dir():
        return _resolve_imagefolder(p, split)
    if depth > 0:
        for child in [p / n for n in _CIFAR_CHILDREN if (p / n).exists()]:
            found = _resolve_cifar(child, split, depth=depth - 1)
            if isinstance(found, _Source):
                return found
    missing = [b.name for b in batches if not b.is_file()]
    return (
        f"folder exists but holds neither the python batches (lacks {', '.join(missing)}) "
        "nor train/test folders"
    )


def _class_dirs(d: Path) -> list[str]:
    if not d.is_dir():
        return []
    return sorted(c.name for c in d.iterdir() if c.is_dir() and not c.name.startswith("."))


def _resolve_imagefolder(p: Path, split: str) -> _Source | str:
    if _is_tar(p):
        return _Source("tarball", p, files=[p])
    if not p.is_dir():
        return "not found" if not p.exists() else "neither a folder nor a .tar(.gz) archive"
    if (p / "train").is_dir() or (p / "test").is_dir():
        split_dir = p / split
        if not split_dir.is_dir():
            return f"has split folders but no {split}/"
        classes = sorted(set(_class_dirs(p / "train")) | set(_class_dirs(p / "test")))
    else:
        split_dir = p
        classes = _class_dirs(p)
        if split != "train" and classes:
            log.warning(
                "%s has no train/ or test/ folders; its class folders serve as the %r split", p, split
            )
    if not classes:
        return "folder exists but has no class folders"
    return _Source("imagefolder", p, split_dir=split_dir, classes=classes)


def _resolve_svhn(p: Path, split: str) -> _Source | str:
    if not p.is_dir():
        return "not found" if not p.exists() else "not a folder"
    f = p / f"{split}_32x32.mat"
    if not f.is_file():
        return f"folder exists but lacks {f.name}"
    return _Source("svhn-mat", p, files=[f])


def _resolve(name: str, p: Path, split: str) -> _Source | str:
    if name in ("mnist", "fashion-mnist"):
        return _resolve_idx(p, split)
    if name == "cifar10":
        return _resolve_cifar(p, split)
    if name == "svhn":
        return _resolve_svhn(p, split)
    return _resolve_imagefolder(p, split)


def _source_checkout() -> Path | None:
    """The repository root when qrobust runs from a source checkout (src/qrobust/data/registry.py)."""
    root = Path(__file__).resolve().parents[3]
    return root if (root / "pyproject.toml").is_file() and (root / "src" / "qrobust").is_dir() else None


def data_dirs() -> list[Path]:
    """Folders searched (in order) for ``<folder>/<dataset>`` when no root is given."""
    dirs = []
    if os.environ.get(DATA_ENV):
        dirs.append(Path(os.environ[DATA_ENV]).expanduser())
    dirs += [Path.cwd() / "data", Path.cwd() / ".." / "shared" / "data"]
    checkout = _source_checkout()
    if checkout is not None:
        dirs.append(checkout / ".." / "shared" / "data")
    out, seen = [], set()
    for d in dirs:
        d = Path(os.path.abspath(d))
        if d not in seen:
            seen.add(d)
            out.append(d)
    return out


def _download_dir(name: str, root: Path | None, cache_root: Path) -> Path:
    if root is not None:
        return root
    if os.environ.get(DATA_ENV):
        return Path(os.environ[DATA_ENV]).expanduser() / name
    return cache_root / "downloads" / name


def _search(name: str, split: str, root: Path | None, cache_root: Path) -> tuple[_Source | None, list[str]]:
    """The first matching source and, for the error message, one line per place looked."""
    looked: list[str] = []

    def try_paths(paths: list[Path]) -> _Source | None:
        for p in paths:
            found = _resolve(name, p, split)
            if isinstance(found, _Source):
                return found
            looked.append(f"{p}: {found}")
        return None

    if root is not None:
        if not root.exists():
            looked.append(f"{root}: does not exist")
            return None, looked
        return try_paths([root] + [root / s for s in _SUBPATHS[name]]), looked
    if name == "imagefolder":
        return None, ["imagefolder has no default location: root is required"]
    for d in data_dirs():
        if not d.is_dir():
            subs = _SUBPATHS[name]
            where = d / subs[0] if len(subs) == 1 else f"{d}/{{{','.join(subs)}}}"
            looked.append(f"{where}: folder {d} does not exist")
            continue
        found = try_paths([d / s for s in _SUBPATHS[name]])
        if found is not None:
            return found, looked
    extra = [*_SYSTEM_DIRS.get(name, ()), cache_root / "downloads" / name]
    return try_paths(extra), looked


def _missing_message(name: str, split: str, looked: list[str], download_hint: bool) -> str:
    lines = "\n".join(f"  - {line}" for line in looked)
    fix = "pass --data-dir DIR (root=DIR) pointing at such files"
    if name != "imagefolder":
        fix += f", or set {DATA_ENV}=DIR with DIR/{_SUBPATHS[name][0]}/ inside"
    if download_hint:
        fix += ", or add --download (download=True) to fetch the official files"
    return (
        f"{_INFO[name].display_name} ({split} split) not found. Expected {_EXPECTED[name]}.\n"
        f"Looked in:\n{lines}\nTo fix: {fix}."
    )


# ------------------------------------------------------------------------------------------------ decoding


def decode_workers() -> int:
    """Processes used to decode image folders: ``$QROBUST_DECODE_WORKERS``, else min(2, CPU count)."""
    env = os.environ.get(WORKERS_ENV)
    if env:
        try:
            return max(1, int(env))
        except ValueError as e:
            raise ConfigError(f"{WORKERS_ENV} must be an integer, got {env!r}") from e
    return max(1, min(2, os.cpu_count() or 1))


def _folder_arrays(
    name: str, items: list[readers.ImageItem], labels: np.ndarray, classes: list[str], where: Path
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Decode an image-folder listing (sorted by class, then file name) into arrays plus meta."""
    if name == "cifar10" and classes != CIFAR10_CLASSES:
        raise DataError(
            f"{where}: class folders {classes} are not the ten CIFAR-10 classes {CIFAR10_CLASSES}; "
            "load other trees as the imagefolder dataset"
        )
    if not items:
        raise DataError(f"{where}: the class folders hold no images ({', '.join(readers.IMAGE_EXTENSIONS)})")
    mode = "RGB" if name == "cifar10" else None
    images = readers.decode_images(items, mode=mode, workers=decode_workers())
    if name == "cifar10" and images.shape[1:] != (3, 32, 32):
        raise DataError(f"{where}: images are {images.shape[2]}x{images.shape[3]}, CIFAR-10 is 32x32")
    # Files are listed class by class; a fixed permutation interleaves the classes so that "the first n"
    # samples of a split cover every class, as in the official CIFAR-10 batches.
    order = np.random.default_rng(0).permutation(len(labels))
    images, labels = images[order], labels[order]
    meta: dict = {
        "classes": classes,
        "display_name": "CIFAR-10 (JPEG)" if name == "cifar10" else f"image folder {where.name}",
    }
    if name == "imagefolder":
        x = images.astype(np.float64) / 255.0  # one split at a time: fine for folder-sized data
        meta["mean"] = [float(v) for v in x.mean(axis=(0, 2, 3))]
        meta["std"] = [float(v) for v in x.std(axis=(0, 2, 3))]
    return images, labels, meta


def _decode_archive(name: str, split: str, archive: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    """Decode one split straight out of a tar archive (one streaming pass; nothing is unpacked to disk)."""
    log.info("reading %s/%s from %s", name, split, archive)

    def keep(member: str) -> bool:
        base = member.rsplit("/", 1)[-1]
        if name == "cifar10" and base in readers.CIFAR_BATCHES["train"] + readers.CIFAR_BATCHES["test"]:
            return True
        return base.lower().endswith(readers.IMAGE_EXTENSIONS)

    members = readers.read_tar(archive, keep=keep)
    if name == "cifar10":
        batches = readers.cifar_batches_in(members, split)
        if batches is not None:
            parts = [readers.read_cifar_batch(f"{archive}:{n}", data) for n, data in batches]
            images = np.concatenate([p[0] for p in parts])
            return images, np.concatenate([p[1] for p in parts]), {"display_name": "CIFAR-10"}
    try:
        items, labels, classes = readers.archive_image_folder(members, split)
    except DataError as e:
        raise DataError(f"{archive}: {e}; expected {_EXPECTED[name]}") from e
    return _folder_arrays(name, items, labels, classes, archive)


def _decode(name: str, split: str, src: _Source) -> tuple[np.ndarray, np.ndarray, dict]:
    """Read a source into (uint8 N×C×H×W, int64 N, meta) — the expensive step the cache avoids."""
    if src.kind == "idx":
        images, labels = readers.read_mnist_pair(src.files[0], src.files[1])
        return images, labels, {}
    if src.kind == "cifar-python":
        images, labels = readers.read_cifar_python(src.path, split)
        return images, labels, {"display_name": "CIFAR-10"}
    if src.kind == "svhn-mat":
        images, labels = readers.read_svhn_mat(src.files[0])
        return images, labels, {}
    if src.kind == "imagefolder":
        assert src.split_dir is not None and src.classes is not None
        items, labels = readers.list_image_folder(src.split_dir, src.classes)
        return _folder_arrays(name, items, labels, src.classes, src.path)
    if src.kind == "tarball":
        return _decode_archive(name, split, src.path)
    raise AssertionError(src.kind)


def _finish(
    name: str, split: str, images: np.ndarray, labels: np.ndarray, meta: dict, source: str
) -> ArrayDataset:
    info = _static_info(name)
    if name == "imagefolder":
        classes = list(meta["classes"])
        info = DatasetInfo(
            "imagefolder",
            len(classes),
            tuple(int(s) for s in images.shape[1:]),
            tuple(meta["mean"]),
            tuple(meta["std"]),
            classes,
            meta["display_name"],
        )
    elif meta.get("display_name"):
        info = replace(info, display_name=meta["display_name"])
    return ArrayDataset(images, labels, info, split=split, source=source)


def _load_source(name: str, split: str, src: _Source, cache_root: Path) -> ArrayDataset:
    t0 = time.perf_counter()
    key = src.key(name, split)
    cpath = _cache.cache_file(cache_root, name, split, str(src.path.resolve()), key)
    cached = _cache.load_arrays(cpath)
    if cached is not None and {"images", "labels", "meta"} <= set(cached):
        meta = json.loads(str(cached["meta"]))
        ds = _finish(name, split, cached["images"], cached["labels"], meta, str(src.path))
        log.info(
            "%s/%s: %d samples from cache %s (%.2f s)", name, split, len(ds), cpath, time.perf_counter() - t0
        )
        return ds
    images, labels, meta = _decode(name, split, src)
    ds = _finish(name, split, images, labels, meta, str(src.path))  # validates before caching
    _cache.save_arrays(
        cpath, {"images": ds.images.numpy(), "labels": ds.labels.numpy(), "meta": np.array(json.dumps(meta))}
    )
    log.info(
        "%s/%s: decoded %d samples from %s in %.2f s (cached at %s)",
        name,
        split,
        len(ds),
        src.path,
        time.perf_counter() - t0,
        cpath,
    )
    return ds


def load_dataset(
    name: str,
    split: str = "train",
    *,
    root: str | os.PathLike | None = None,
    download: bool = False,
    cache_dir: str | os.PathLike | None = None,
    mirror: str | None = None,
) -> ArrayDataset:
    """Load one split of a registered dataset as an :class:`ArrayDataset` (uint8 images in memory).

    ``root``: a folder (or archive) holding the dataset, or a data folder with ``<dataset>/`` inside; when
    ``None``, ``$QROBUST_DATA/<dataset>``, ``./data/<dataset>`` and ``../shared/data/<dataset>`` are searched.
    ``download``: fetch the official files (checksum-verified) if nothing usable is found, into ``root``,
    else ``$QROBUST_DATA/<dataset>``, else ``<cache_dir>/downloads/<dataset>``; ``mirror`` overrides the
    download URL (see :mod:`qrobust.data.download`). ``cache_dir``: where decoded arrays are cached
    (default ``$QROBUST_CACHE`` or ``~/.cache/qrobust``).
    """
    name = _canonical(name)
    if split not in SPLITS:
        raise ConfigError(f"split must be one of {SPLITS}, got {split!r}")
    if name == "digits":
        images, labels = readers.read_digits(split)
        return ArrayDataset(
            images, labels, _static_info("digits"), split=split, source="sklearn.datasets.load_digits"
        )
    if name == "imagefolder" and root is None:
        raise ConfigError(
            "imagefolder needs root= (--data-dir): a folder of class folders, or one with "
            "train/ and test/ inside"
        )
    if download and name == "imagefolder":
        raise ConfigError(
            "imagefolder cannot be downloaded; drop --download and pass the folder with --data-dir"
        )
    root_path = None if root is None else Path(root).expanduser()
    cache_root = _cache.resolve_cache_dir(cache_dir)

    src, looked = _search(name, split, root_path, cache_root)
    if src is not None:
        try:
            return _load_source(name, split, src, cache_root)
        except DataError as e:
            if not download:
                raise
            log.warning("%s; downloading fresh official files", e)
    if download:
        dest = _download_dir(name, root_path, cache_root)
        fetch_dataset(name, dest, split=split, mirror=mirror)
        src, more = _search(name, split, dest, cache_root)
        looked += more
        if src is not None:
            return _load_source(name, split, src, cache_root)
    raise DataError(_missing_message(name, split, looked, download_hint=not download))
