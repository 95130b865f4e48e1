"""Fetching the official dataset files: known URLs and checksums, atomic writes, clear errors.

The base URL of every dataset can be overridden by ``mirror=`` (``load_dataset(..., mirror=...)``) or the
``QROBUST_DATA_MIRROR`` environment variable: either a base URL to which the official file names are
appended, or a template containing ``{name}`` (the qrobust dataset name), e.g.
``https://example.org/datasets/{name}/``. ``file://`` URLs work too.
"""

from __future__ import annotations

import hashlib
import logging
import os
import urllib.error
import urllib.request
from pathlib import Path

from qrobust.errors import ConfigError, DataError
from qrobust.utils import atomic_write

log = logging.getLogger(__name__)

MIRROR_ENV = "QROBUST_DATA_MIRROR"

#: Where each dataset's official files live.
BASE_URLS: dict[str, str] = {
    "mnist": "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "fashion-mnist": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "cifar10": "https://www.cs.toronto.edu/~kriz/",
    "svhn": "http://ufldl.stanford.edu/housenumbers/",
}

#: Checksums of the official files as downloaded (32 hex digits: MD5; 64: SHA-256).
CHECKSUMS: dict[str, dict[str, str]] = {
    "mnist": {
        "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    },
    "fashion-mnist": {
        "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
    },
    "cifar10": {"cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a"},
    "svhn": {
        "train_32x32.mat": "e26dedcc434d2e4c54c9b2d4a06d8373",
        "test_32x32.mat": "eb5a983be6a315427106f1b164d9cef3",
    },
}

#: Files a split needs, where a dataset's splits live in separate downloads (else: all files).
SPLIT_FILES: dict[str, dict[str, list[str]]] = {
    "svhn": {"train": ["train_32x32.mat"], "test": ["test_32x32.mat"]},
}

_CHUNK = 1 << 20


def downloadable() -> list[str]:
    return sorted(CHECKSUMS)


def file_digest(path: Path, algorithm: str) -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _algorithm(checksum: str) -> str:
    algo = {32: "md5", 64: "sha256"}.get(len(checksum))
    if algo is None:
        raise ConfigError(f"checksum {checksum!r} is neither an MD5 (32 hex digits) nor a SHA-256 (64)")
    return algo


def base_url(name: str, mirror: str | None = None) -> str:
    """The URL folder the files of ``name`` come from: mirror, else $QROBUST_DATA_MIRROR, else official."""
    chosen = mirror or os.environ.get(MIRROR_ENV) or BASE_URLS[name]
    chosen = chosen.replace("{name}", name)
    return chosen if chosen.endswith("/") else chosen + "/"


def download_file(url: str, dest: Path, *, checksum: str | None = None, timeout: float = 60.0) -> Path:
    """Download ``url`` to ``dest`` atomically, verifying ``checksum`` (MD5 or SHA-256 hex) if given.

    The bytes go to a temp file beside ``dest`` and are renamed into place only when complete and
    verified; on any failure the temp file is removed and a DataError says what happened.
    """
    algo = _algorithm(checksum) if checksum else "sha256"
    h = hashlib.new(algo)

    def write(tmp: str) -> None:
        try:
            with open(tmp, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
                for block in iter(lambda: resp.read(_CHUNK), b""):
                    out.write(block)
                    h.update(block)
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise DataError(
                f"could not download {url} ({type(e).__name__}: {e}); check the network, set "
                f"{MIRROR_ENV} to a reachable mirror, or download the file yourself and pass its "
                "folder with --data-dir"
            ) from e
        got = h.hexdigest()
        if checksum and got != checksum.lower():
            raise DataError(
                f"checksum mismatch for {url}: expected {algo} {checksum}, got {got}; the download "
                "is corrupt or the mirror serves a different file - try again or use another mirror"
            )

    atomic_write(dest, write)
    log.info("downloaded %s -> %s", url, dest)
    return dest


def fetch_dataset(
    name: str, dest: Path, *, split: str | None = None, mirror: str | None = None, timeout: float = 60.0
) -> list[Path]:
    """Make sure the official files of ``name`` (only the given split's, where splits are separate files)
    are in ``dest``, downloading missing or corrupt ones. Returns their paths."""
    if name not in CHECKSUMS:
        raise ConfigError(
            f"{name!r} cannot be downloaded; downloadable datasets: {', '.join(downloadable())}"
        )
    files = CHECKSUMS[name]
    wanted = SPLIT_FILES.get(name, {}).get(split or "", list(files))
    base = base_url(name, mirror)
    paths = []
    for filename in wanted:
        target = dest / filename
        checksum = files[filename]
        if target.is_file():
            if file_digest(target, _algorithm(checksum)) == checksum.lower():
                log.debug("%s already present and verified", target)
                paths.append(target)
                continue
            log.warning("%s exists but fails its checksum; downloading it again", target)
        log.info("downloading %s%s", base, filename)
        paths.append(download_file(base + filename, target, checksum=checksum, timeout=timeout))
    return paths
