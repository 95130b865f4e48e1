"""The data room: registry, readers, cache, downloads, BatchLoader and augmentation."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import io
import json
import logging
import os
import pickle
import socket
import struct
import tarfile
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from qrobust.data import (
    ArrayDataset,
    BatchLoader,
    DatasetInfo,
    available_datasets,
    dataset_info,
    load_dataset,
    registry,
    transforms,
)
from qrobust.data import download as dl
from qrobust.errors import ConfigError, DataError, InputError

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO / ".." / "shared" / "data"
MNIST_DIR = SHARED / "mnist"
CIFAR_TARBALL = SHARED / "cifar10-jpeg.tar.gz"
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


# ------------------------------------------------------------------------------------------------ helpers


def idx_bytes(arr: np.ndarray) -> bytes:
    arr = np.asarray(arr, dtype=np.uint8)
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return header + arr.tobytes()


def make_mnist(folder: Path, *, n_train: int = 12, n_test: int = 5, gz: bool = True, seed: int = 0) -> dict:
    """A tiny MNIST-format dataset; returns the arrays written."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for split, stem, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        x = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        y = rng.integers(0, 10, n, dtype=np.uint8)
        for kind, arr in (("images-idx3", x), ("labels-idx1", y)):
            data = idx_bytes(arr)
            name = f"{stem}-{kind}-ubyte"
            if gz:
                (folder / (name + ".gz")).write_bytes(gzip.compress(data))
            else:
                (folder / name).write_bytes(data)
        arrays[split] = (x, y)
    return arrays


def cifar_batch(images: np.ndarray, labels: np.ndarray) -> bytes:
    """A CIFAR-10 python batch as the official files hold it (numpy globals named numpy.core.multiarray)."""
    obj = {
        b"batch_label": b"fake",
        b"labels": [int(v) for v in labels],
        b"data": images.reshape(len(images), -1),
        b"filenames": [b"f%d.png" % i for i in range(len(images))],
    }
    data = pickle.dumps(obj, protocol=3)
    data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert b"numpy.core.multiarray" in data
    return data


def make_cifar_python(folder: Path, *, per_batch: int = 3, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out: dict[str, list] = {"train": [], "test": []}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        x = rng.integers(0, 256, (per_batch, 3, 32, 32), dtype=np.uint8)
        y = rng.integers(0, 10, per_batch)
        (folder / name).write_bytes(cifar_batch(x, y))
        out["test" if name == "test_batch" else "train"].append((x, y))
    (folder / "batches.meta").write_bytes(
        pickle.dumps({b"label_names": [c.encode() for c in CIFAR10_CLASSES]})
    )
    return {k: (np.concatenate([a for a, _ in v]), np.concatenate([b for _, b in v])) for k, v in out.items()}


def pixel_value(label: int, j: int, split: str) -> int:
    """The constant grey level of image j of class label in a generated tree (unique per image)."""
    return 1 + 12 * label + 3 * j + (1 if split == "test" else 0)


def make_image_tree(root: Path, classes: list[str], counts: dict[str, int], *, size=(32, 32), mode="RGB"):
    """root/<split>/<class>/NNNN.png, every image a constant colour that encodes (split, class, index)."""
    for split, n in counts.items():
        for label, cls in enumerate(classes):
            d = root / split / cls
            d.mkdir(parents=True, exist_ok=True)
            for j in range(n):
                v = pixel_value(label, j, split)
                if mode == "L":
                    arr = np.full((size[1], size[0]), v, dtype=np.uint8)
                else:
                    arr = np.stack([np.full((size[1], size[0]), v + k, dtype=np.uint8) for k in range(3)], -1)
                Image.fromarray(arr, mode=mode).save(d / f"{j:04d}.png")


def make_tarball(path: Path, folder: Path, arcname: str) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        tar.add(folder, arcname=arcname)
    return path


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "cache"


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """An HTTP server on 127.0.0.1 serving tmp_path/www, recording the paths requested."""
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv(dl.MIRROR_ENV, raising=False)
    www = tmp_path / "www"
    www.mkdir()
    hits: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(www), **kwargs)

        def log_message(self, *args):  # keep the test output clean
            pass

        def do_GET(self):
            hits.append(self.path)
            super().do_GET()

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield SimpleNamespace(root=www, url=f"http://127.0.0.1:{srv.server_port}/", hits=hits)
    finally:
        srv.shutdown()
        srv.server_close()


def ds_from(images: np.ndarray, labels: np.ndarray, name: str = "test") -> ArrayDataset:
    c, h, w = images.shape[1:]
    info = DatasetInfo(name, 10, (c, h, w), (0.5,) * c, (0.25,) * c, [str(i) for i in range(10)])
    return ArrayDataset(torch.from_numpy(images), torch.from_numpy(labels), info, split="train")


# ----------------------------------------------------------------------------------------------- registry


def test_registry_names_and_static_info():
    assert available_datasets() == ["digits", "mnist", "fashion-mnist", "cifar10", "svhn", "imagefolder"]
    info = dataset_info("CIFAR-10")  # aliases and case are forgiven
    assert info.name == "cifar10" and info.input_shape == (3, 32, 32) and info.classes == CIFAR10_CLASSES
    assert info.mean == (0.4914, 0.4822, 0.4465) and info.std == (0.2470, 0.2435, 0.2616)
    assert dataset_info("mnist").mean == (0.1307,) and dataset_info("mnist").std == (0.3081,)
    assert dataset_info("fashion_mnist").classes[9] == "Ankle boot"
    folder = dataset_info("imagefolder")
    assert folder.classes is None and folder.num_classes is None and folder.input_shape is None
    assert DatasetInfo.from_dict(json.loads(json.dumps(info.to_dict()))) == info
    with pytest.raises(ConfigError, match="available: digits, mnist"):
        dataset_info("imagenet")
    with pytest.raises(ConfigError, match="split"):
        load_dataset("digits", "val")
    with pytest.raises(ConfigError, match="root"):
        load_dataset("imagefolder")


def test_digits_split_is_deterministic_stratified_and_scaled():
    from sklearn.datasets import load_digits

    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    assert (len(train), len(test)) == (1438, 359)
    assert train.images.shape[1:] == (1, 8, 8) and train.images.dtype == torch.uint8
    again = load_dataset("digits", "test")
    assert torch.equal(again.images, test.images) and torch.equal(again.labels, test.labels)

    raw = load_digits()
    scaled = np.rint(raw.images * 255 / 16).astype(np.uint8)
    # train ∪ test is exactly the bundled set: same multiset of (image, label) rows.
    rows = lambda x, y: sorted(a.tobytes() + bytes([b]) for a, b in zip(x, y))  # noqa: E731
    both_x = np.concatenate([train.images.numpy()[:, 0], test.images.numpy()[:, 0]])
    both_y = np.concatenate([train.labels.numpy(), test.labels.numpy()])
    assert rows(both_x, both_y) == rows(scaled, raw.target)
    assert set(np.unique(train.images.numpy())) <= {round(v * 255 / 16) for v in range(17)}
    assert int(train.images.max()) == 255
    # stratified: every class contributes round(20 %) of its samples to the test split
    per_class = np.bincount(raw.target)
    assert np.array_equal(np.bincount(test.labels.numpy()), np.rint(0.2 * per_class).astype(int))
    # the published mean/std are those of the train split
    x = train.images.double() / 255
    assert train.info.mean[0] == pytest.approx(x.mean().item(), abs=1e-4)
    assert train.info.std[0] == pytest.approx(x.std().item(), abs=1e-3)


# ------------------------------------------------------------------------------------------------ MNIST


@pytest.mark.skipif(not MNIST_DIR.is_dir(), reason="../shared/data/mnist not present")
def test_real_mnist_found_by_default_search(monkeypatch, cache):
    monkeypatch.delenv(registry.DATA_ENV, raising=False)
    monkeypatch.chdir(REPO)
    train = load_dataset("mnist", "train", cache_dir=cache)
    test = load_dataset("mnist", "test", cache_dir=cache)
    assert Path(train.source).resolve() == MNIST_DIR.resolve()
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    assert int(train.labels[0]) == 5 and int(test.labels[0]) == 7
    assert np.array_equal(
        np.bincount(test.labels.numpy()), [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    )
    # byte-exact: the README's MD5 of the uncompressed files, rebuilt from the decoded arrays
    header = struct.pack(">IIII", 0x803, 60000, 28, 28)
    assert (
        hashlib.md5(header + train.images.numpy().tobytes()).hexdigest() == "6bbc9ace898e44ae57da46a324031adb"
    )
    header = struct.pack(">II", 0x801, 10000)
    labels = test.labels.numpy().astype(np.uint8).tobytes()
    assert hashlib.md5(header + labels).hexdigest() == "27ae3e4e09519cfbb04c329615203637"


def test_idx_gz_and_uncompressed_give_the_same_arrays(tmp_path, cache):
    arrays = make_mnist(tmp_path / "gz", gz=True)
    make_mnist(tmp_path / "raw", gz=False)
    for split in ("train", "test"):
        a = load_dataset("mnist", split, root=tmp_path / "gz", cache_dir=cache)
        b = load_dataset("fashion-mnist", split, root=tmp_path / "raw", cache_dir=cache)
        x, y = arrays[split]
        assert np.array_equal(a.images.numpy()[:, 0], x) and np.array_equal(a.labels.numpy(), y)
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
        assert b.info.name == "fashion-mnist" and b.info.classes[0] == "T-shirt/top"
    # root may also be a data folder holding mnist/ (like ../shared/data)
    make_mnist(tmp_path / "datadir" / "mnist")
    assert len(load_dataset("mnist", "test", root=tmp_path / "datadir", cache_dir=cache)) == 5


def _corrupt(folder: Path, how: str) -> str:
    """Break one file of a fake MNIST folder; returns the name of the file the error must mention."""
    labels = folder / "train-labels-idx1-ubyte.gz"
    images = folder / "train-images-idx3-ubyte.gz"
    if how == "truncated-gz":
        images.write_bytes(images.read_bytes()[:200])
        return images.name
    if how == "not-gzip":
        images.write_bytes(b"definitely not gzip data" * 10)
        return images.name
    if how == "bad-magic":
        labels.write_bytes(gzip.compress(b"\x08\x03\x00\x00" + bytes(20)))
        return labels.name
    if how == "short-payload":
        labels.write_bytes(gzip.compress(idx_bytes(np.zeros(12, np.uint8))[:-3]))
        return labels.name
    if how == "count-mismatch":
        labels.write_bytes(gzip.compress(idx_bytes(np.zeros(11, np.uint8))))
        return labels.name
    if how == "label-range":
        labels.write_bytes(gzip.compress(idx_bytes(np.full(12, 10, np.uint8))))
        return labels.name
    if how == "swapped":
        images.write_bytes(labels.read_bytes())
        return images.name
    raise AssertionError(how)


@pytest.mark.parametrize(
    "how",
    ["truncated-gz", "not-gzip", "bad-magic", "short-payload", "count-mismatch", "label-range", "swapped"],
)
def test_corrupt_mnist_raises_data_error_naming_the_file(tmp_path, cache, how):
    make_mnist(tmp_path / "m")
    bad = _corrupt(tmp_path / "m", how)
    with pytest.raises(DataError, match=bad.replace(".", r"\.")):
        load_dataset("mnist", "train", root=tmp_path / "m", cache_dir=cache)
    assert len(load_dataset("mnist", "test", root=tmp_path / "m", cache_dir=cache)) == 5  # other split fine


def test_missing_root_names_paths_and_fixes(tmp_path, cache):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError) as err:
        load_dataset("mnist", root=missing, cache_dir=cache)
    msg = str(err.value)
    assert str(missing) in msg and "train-images-idx3-ubyte.gz" in msg
    assert "--data-dir" in msg and "--download" in msg
    (tmp_path / "half").mkdir()
    make_mnist(tmp_path / "half")
    (tmp_path / "half" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="lacks t10k-labels-idx1-ubyte"):
        load_dataset("mnist", "test", root=tmp_path / "half", cache_dir=cache)


def test_default_search_lists_every_place_looked(tmp_path, cache, monkeypatch):
    env_dir, work = tmp_path / "envdata", tmp_path / "work"
    env_dir.mkdir()
    (work / "data").mkdir(parents=True)
    monkeypatch.setenv(registry.DATA_ENV, str(env_dir))
    monkeypatch.chdir(work)
    with pytest.raises(DataError) as err:
        load_dataset("svhn", "test", cache_dir=cache)
    msg = str(err.value)
    for place in (env_dir / "svhn", work / "data" / "svhn", cache / "downloads" / "svhn"):
        assert str(place) in msg, (place, msg)
    assert os.path.abspath(work / ".." / "shared" / "data") in msg
    assert "test_32x32.mat" in msg and "--download" in msg and registry.DATA_ENV in msg


# -------------------------------------------------------------------------------------------------- cache


def test_cache_hit_skips_decoder_and_a_changed_source_invalidates(tmp_path, cache, monkeypatch):
    make_mnist(tmp_path / "m")
    calls = []
    real = registry._decode

    def counting(*args, **kwargs):
        calls.append(args[:2])
        return real(*args, **kwargs)

    monkeypatch.setattr(registry, "_decode", counting)
    first = load_dataset("mnist", "train", root=tmp_path / "m", cache_dir=cache)
    second = load_dataset("mnist", "train", root=tmp_path / "m", cache_dir=cache)
    assert len(calls) == 1
    assert torch.equal(first.images, second.images) and torch.equal(first.labels, second.labels)
    files = list((cache / "arrays").iterdir())
    assert len(files) == 1 and files[0].suffix == ".npz"  # no temp files left behind

    # rewrite the labels: new content, new mtime -> decoded again, old cache file replaced
    labels = tmp_path / "m" / "train-labels-idx1-ubyte.gz"
    new = (first.labels.numpy() + 1) % 10
    labels.write_bytes(gzip.compress(idx_bytes(new.astype(np.uint8))))
    os.utime(labels, ns=(1_000_000_000, 1_000_000_000))
    third = load_dataset("mnist", "train", root=tmp_path / "m", cache_dir=cache)
    assert len(calls) == 2 and np.array_equal(third.labels.numpy(), new)
    assert len(list((cache / "arrays").iterdir())) == 1

    # an unreadable cache file is rebuilt, not trusted
    only = next((cache / "arrays").iterdir())
    only.write_bytes(b"garbage")
    fourth = load_dataset("mnist", "train", root=tmp_path / "m", cache_dir=cache)
    assert len(calls) == 3 and torch.equal(fourth.labels, third.labels)


def test_unwritable_cache_still_loads(tmp_path, caplog):
    make_mnist(tmp_path / "m")
    blocker = tmp_path / "file-not-dir"
    blocker.write_text("x")
    with caplog.at_level(logging.WARNING):
        ds = load_dataset("mnist", "test", root=tmp_path / "m", cache_dir=blocker)
    assert len(ds) == 5 and "could not write cache file" in caplog.text


# ---------------------------------------------------------------------------------------------- CIFAR-10


def test_cifar_python_batches_layout_and_order(tmp_path, cache):
    arrays = make_cifar_python(tmp_path / "cifar-10-batches-py")
    # root = the data folder: cifar-10-batches-py/ is found inside it
    train = load_dataset("cifar10", "train", root=tmp_path, cache_dir=cache)
    test = load_dataset("cifar10", "test", root=tmp_path / "cifar-10-batches-py", cache_dir=cache)
    x, y = arrays["train"]
    assert train.images.shape == (15, 3, 32, 32) and np.array_equal(train.images.numpy(), x)
    assert np.array_equal(train.labels.numpy(), y) and np.array_equal(test.labels.numpy(), arrays["test"][1])
    # the row layout: 1024 red, then green, then blue values, each row-major
    row = pickle.loads((tmp_path / "cifar-10-batches-py" / "data_batch_1").read_bytes())[b"data"][1]
    assert int(train.images[1, 2, 3, 5]) == int(row[2 * 1024 + 3 * 32 + 5])
    assert train.info.display_name == "CIFAR-10"


def test_cifar_batch_unpickling_is_guarded(tmp_path, cache):
    folder = tmp_path / "cifar-10-batches-py"
    make_cifar_python(folder)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (folder / "test_batch").write_bytes(pickle.dumps({b"data": Evil(), b"labels": [0]}))
    with pytest.raises(DataError, match="test_batch"):
        load_dataset("cifar10", "test", root=folder, cache_dir=cache)
    assert not marker.exists()
    from qrobust.data import readers

    (tmp_path / "other.pkl").write_bytes(pickle.dumps({b"data": b"", b"labels": []}))
    with pytest.raises(DataError, match="refusing to unpickle"):
        readers.read_cifar_batch(tmp_path / "other.pkl")


def test_cifar_image_folder_tree_and_tarball_agree(tmp_path, cache):
    tree = tmp_path / "cifar10-jpeg"
    make_image_tree(tree, CIFAR10_CLASSES, {"train": 3, "test": 2})
    tarball = make_tarball(tmp_path / "cifar10-jpeg.tar.gz", tree, "cifar10-jpeg")
    for split, per_class in (("train", 3), ("test", 2)):
        from_dir = load_dataset("cifar10", split, root=tree, cache_dir=cache)
        from_tar = load_dataset("cifar10", split, root=tarball, cache_dir=cache)
        assert from_dir.images.shape == (10 * per_class, 3, 32, 32)
        assert torch.equal(from_dir.images, from_tar.images) and torch.equal(from_dir.labels, from_tar.labels)
        assert from_tar.info.display_name == "CIFAR-10 (JPEG)"
        assert np.array_equal(np.bincount(from_tar.labels.numpy()), [per_class] * 10)
        # each image's colour encodes its class: labels follow their images through the shuffle
        expected = {pixel_value(k, j, split) for k in range(10) for j in range(per_class)}
        got = set()
        for img, label in zip(from_tar.images, from_tar.labels):
            v = int(img[0, 0, 0])
            assert (v - 1 - (split == "test")) // 12 == int(label)
            assert torch.equal(img[1], img[0] + 1) and torch.equal(img[2], img[0] + 2)
            got.add(v)
        assert got == expected
        # classes are interleaved, not listed class by class: the first 10 samples span many classes
        labels = from_tar.labels.tolist()
        assert labels != sorted(labels) and len(set(labels[:10])) >= 5
    assert not (cache / "extracted").exists()  # the archive is read in memory, never unpacked


@pytest.mark.parametrize("member", ["../evil.png", "/abs/evil.png", "link"])
def test_unsafe_tarball_members_are_rejected(tmp_path, cache, member):
    tree = tmp_path / "cifar10-jpeg"
    make_image_tree(tree, CIFAR10_CLASSES, {"train": 1, "test": 1})
    tarball = tmp_path / "cifar10-jpeg.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(tree, arcname="cifar10-jpeg")
        if member == "link":
            info = tarfile.TarInfo("cifar10-jpeg/train/cat/9999.png")
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tar.addfile(info)
        else:
            payload = (tree / "train" / "cat" / "0000.png").read_bytes()
            info = tarfile.TarInfo(member)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    with pytest.raises(DataError, match="refusing"):
        load_dataset("cifar10", "train", root=tarball, cache_dir=cache)
    assert not (tmp_path.parent / "evil.png").exists() and not Path("/abs/evil.png").exists()


# ------------------------------------------------------------------------------------ imagefolder & SVHN


def test_imagefolder_generic_trees(tmp_path, cache, caplog):
    flat = tmp_path / "flat"
    make_image_tree(flat, ["b_cls", "a_cls", "c_cls"], {"train": 2}, size=(12, 10), mode="L")
    ds = load_dataset("imagefolder", root=flat / "train", cache_dir=cache)
    assert ds.info.classes == ["a_cls", "b_cls", "c_cls"] and ds.info.num_classes == 3
    assert ds.images.shape == (6, 1, 10, 12) and ds.info.input_shape == (1, 10, 12)
    x = ds.images.double() / 255
    assert ds.info.mean[0] == pytest.approx(x.mean().item()) and ds.info.std[0] == pytest.approx(
        x.std(unbiased=False).item()
    )
    for img, label in zip(ds.images, ds.labels):  # a_cls was written second (label 1 when generated)
        generated = ["b_cls", "a_cls", "c_cls"].index(ds.info.classes[int(label)])
        assert (int(img[0, 0, 0]) - 1) // 12 == generated
    with caplog.at_level(logging.WARNING):
        same = load_dataset("imagefolder", "test", root=flat / "train", cache_dir=cache)
    assert torch.equal(same.images, ds.images) and "no train/ or test/" in caplog.text

    # split folders where test lacks a class: labels still index the union of classes
    split = tmp_path / "split"
    make_image_tree(split, ["x", "y", "z"], {"train": 1})
    make_image_tree(split, ["x", "z"], {"test": 1})
    test = load_dataset("imagefolder", "test", root=split, cache_dir=cache)
    assert test.info.classes == ["x", "y", "z"] and sorted(test.labels.tolist()) == [0, 2]

    odd = tmp_path / "odd"
    make_image_tree(odd, ["p", "q"], {"train": 1})
    Image.new("RGB", (8, 8)).save(odd / "train" / "q" / "zzz.png")
    with pytest.raises(DataError, match="zzz.png"):
        load_dataset("imagefolder", root=odd, cache_dir=cache)


def test_parallel_decode_matches_sequential_and_names_broken_images(monkeypatch):
    from qrobust.data import readers

    monkeypatch.setattr(readers, "PARALLEL_MIN_IMAGES", 64)
    contexts = []
    real_get_context = readers.multiprocessing.get_context
    monkeypatch.setattr(
        readers.multiprocessing, "get_context", lambda m: contexts.append(m) or real_get_context(m)
    )
    rng = np.random.default_rng(2)
    items = []
    for i in range(300):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)).save(buf, format="PNG")
        items.append((f"img{i}.png", buf.getvalue()))
    one = readers.decode_images(items, workers=1)
    assert contexts == []
    two = readers.decode_images(items, workers=2, chunk=50)
    assert contexts == ["fork"]  # the pool really ran
    assert one.shape == (len(items), 3, 4, 5) and np.array_equal(one, two)
    first = np.asarray(Image.open(io.BytesIO(items[0][1])))
    assert np.array_equal(one[0], first.transpose(2, 0, 1))
    items[-1] = ("broken.png", b"not a png")
    with pytest.raises(DataError, match="broken.png"):
        readers.decode_images(items, workers=2)


def test_svhn_mat_layout_and_label_ten_is_zero(tmp_path, cache):
    import scipy.io

    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (32, 32, 3, 7), dtype=np.uint8)
    y = np.array([[10], [1], [2], [9], [10], [5], [3]], dtype=np.uint8)
    (tmp_path / "svhn").mkdir()
    scipy.io.savemat(tmp_path / "svhn" / "test_32x32.mat", {"X": x, "y": y})
    ds = load_dataset("svhn", "test", root=tmp_path, cache_dir=cache)
    assert ds.images.shape == (7, 3, 32, 32)
    assert ds.labels.tolist() == [0, 1, 2, 9, 0, 5, 3]
    assert int(ds.images[4, 2, 7, 30]) == int(x[7, 30, 2, 4])
    with pytest.raises(DataError, match="train_32x32.mat"):
        load_dataset("svhn", "train", root=tmp_path, cache_dir=cache)


# ------------------------------------------------------------------------------------------------ download


def test_download_fake_mnist_from_local_server(tmp_path, cache, server, monkeypatch):
    arrays = make_mnist(server.root / "mnist")
    sums = {p.name: md5(p) for p in (server.root / "mnist").iterdir()}
    monkeypatch.setitem(dl.CHECKSUMS, "mnist", sums)
    dest = tmp_path / "downloaded"
    ds = load_dataset(
        "mnist", "train", root=dest, download=True, cache_dir=cache, mirror=server.url + "{name}"
    )
    assert np.array_equal(ds.images.numpy()[:, 0], arrays["train"][0])
    assert sorted(server.hits) == sorted(f"/mnist/{n}" for n in sums)
    assert sorted(p.name for p in dest.iterdir()) == sorted(sums)  # no temp files left
    # files present and verified: nothing is fetched again
    load_dataset("mnist", "test", root=dest, download=True, cache_dir=cache, mirror=server.url + "{name}")
    assert len(server.hits) == 4

    # no root: downloads go to <cache>/downloads/<name>, which the default search then finds
    monkeypatch.setenv(dl.MIRROR_ENV, server.url + "mnist/")
    monkeypatch.delenv(registry.DATA_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(registry, "_source_checkout", lambda: None)
    monkeypatch.setattr(registry, "_SYSTEM_DIRS", {})
    monkeypatch.setitem(dl.CHECKSUMS, "fashion-mnist", sums)
    fm = load_dataset("fashion-mnist", "test", download=True, cache_dir=cache)
    assert (cache / "downloads" / "fashion-mnist" / "t10k-images-idx3-ubyte.gz").is_file()
    assert np.array_equal(fm.labels.numpy(), arrays["test"][1])
    again = load_dataset("fashion-mnist", "test", cache_dir=cache)  # found without --download
    assert torch.equal(again.images, fm.images)


def test_corrupt_download_raises_and_leaves_no_partial_file(tmp_path, cache, server, monkeypatch):
    make_mnist(server.root / "mnist")
    sums = {p.name: md5(p) for p in (server.root / "mnist").iterdir()}
    sums["train-images-idx3-ubyte.gz"] = "0" * 32  # the served file will not match
    monkeypatch.setitem(dl.CHECKSUMS, "mnist", sums)
    dest = tmp_path / "dest"
    with pytest.raises(DataError, match="checksum mismatch"):
        load_dataset("mnist", "train", root=dest, download=True, cache_dir=cache, mirror=server.url + "mnist")
    leftovers = [p.name for p in dest.iterdir()] if dest.exists() else []
    assert "train-images-idx3-ubyte.gz" not in leftovers and not any(n.endswith(".part") for n in leftovers)

    # an existing file that fails its checksum is replaced by a verified download
    sums["train-images-idx3-ubyte.gz"] = md5(server.root / "mnist" / "train-images-idx3-ubyte.gz")
    (dest / "train-images-idx3-ubyte.gz").write_bytes(b"stale")
    dl.fetch_dataset("mnist", dest, mirror=server.url + "mnist")
    assert md5(dest / "train-images-idx3-ubyte.gz") == sums["train-images-idx3-ubyte.gz"]

    with pytest.raises(DataError, match="could not download .*404"):
        dl.download_file(server.url + "missing.gz", tmp_path / "x.gz")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DataError, match="could not download"):
        dl.download_file(f"http://127.0.0.1:{port}/f.gz", tmp_path / "y.gz", timeout=5)
    assert not list(tmp_path.glob("*.part")) and not list(tmp_path.glob(".*.part"))


def test_download_cifar_python_tarball(tmp_path, cache, server, monkeypatch):
    arrays = make_cifar_python(tmp_path / "build" / "cifar-10-batches-py", per_batch=2)
    archive = make_tarball(
        server.root / "cifar-10-python.tar.gz",
        tmp_path / "build" / "cifar-10-batches-py",
        "cifar-10-batches-py",
    )
    monkeypatch.setitem(dl.CHECKSUMS, "cifar10", {"cifar-10-python.tar.gz": md5(archive)})
    dest = tmp_path / "dest"
    test = load_dataset("cifar10", "test", root=dest, download=True, cache_dir=cache, mirror=server.url)
    assert np.array_equal(test.images.numpy(), arrays["test"][0]) and test.info.display_name == "CIFAR-10"
    train = load_dataset("cifar10", "train", root=dest, cache_dir=cache)
    assert np.array_equal(train.labels.numpy(), arrays["train"][1])
    assert server.hits == ["/cifar-10-python.tar.gz"]


def test_download_tables_and_mirrors(monkeypatch):
    monkeypatch.delenv(dl.MIRROR_ENV, raising=False)
    assert set(dl.CHECKSUMS) == {"mnist", "fashion-mnist", "cifar10", "svhn"} == set(dl.BASE_URLS)
    assert dl.CHECKSUMS["cifar10"]["cifar-10-python.tar.gz"] == "c58f30108f718f92721af3b95e74349a"
    assert all(len(v) in (32, 64) for files in dl.CHECKSUMS.values() for v in files.values())
    assert dl.base_url("cifar10") == "https://www.cs.toronto.edu/~kriz/"
    assert dl.base_url("svhn", "http://m.example/{name}") == "http://m.example/svhn/"
    monkeypatch.setenv(dl.MIRROR_ENV, "file:///srv/data/{name}/")
    assert dl.base_url("mnist") == "file:///srv/data/mnist/"
    with pytest.raises(ConfigError, match="cannot be downloaded"):
        load_dataset("imagefolder", root=".", download=True)


# ---------------------------------------------------------------------------------------------- datasets


def test_array_dataset_items_tensors_and_subsets():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (40, 1, 4, 4), dtype=np.uint8)
    labels = np.repeat(np.arange(4), 10)
    ds = ds_from(images, labels)
    x, y = ds[3]
    assert x.dtype == torch.float32 and torch.equal(x, torch.from_numpy(images[3]).float() / 255) and y == 0
    xs, ys = ds.tensors(5)
    assert xs.shape == (5, 1, 4, 4) and torch.equal(xs * 255, torch.from_numpy(images[:5]).float())
    assert ds.tensors()[0].shape[0] == 40
    sub = ds.subset(8, seed=3)
    assert len(sub) == 8 and torch.equal(sub.images, ds.subset(8, seed=3).images)
    assert not torch.equal(sub.images, ds.subset(8, seed=4).images)
    strat = ds.subset(8, seed=5, stratified=True)
    assert np.array_equal(np.bincount(strat.labels.numpy()), [2, 2, 2, 2])
    with pytest.raises(ConfigError):
        ds.subset(41)
    with pytest.raises(DataError, match="labels range"):
        ds_from(images, np.full(40, 10))
    with pytest.raises(DataError, match="uint8"):
        ArrayDataset(torch.zeros(2, 1, 4, 4), torch.zeros(2, dtype=torch.long), ds.info)


# ------------------------------------------------------------------------------------------- BatchLoader


def test_loader_plain_order_and_float_conversion():
    images = np.random.default_rng(0).integers(0, 256, (23, 1, 5, 5), dtype=np.uint8)
    ds = ds_from(images, np.arange(23) % 10)
    loader = BatchLoader(ds, 5)
    batches = list(loader)
    assert len(loader) == len(batches) == 5 and [len(b[1]) for b in batches] == [5, 5, 5, 5, 3]
    x = torch.cat([b[0] for b in batches])
    assert x.dtype == torch.float32 and torch.equal(x, ds.images.float() / 255)
    assert torch.equal(torch.cat([b[1] for b in batches]), ds.labels)
    assert len(BatchLoader(ds, 5, drop_last=True)) == 4
    with pytest.raises(ConfigError):
        BatchLoader(ds, 0)
    with pytest.raises(ConfigError):
        BatchLoader(ds, 4, rank=2, world_size=2)


def test_loader_shuffle_is_deterministic_per_seed_and_epoch():
    ds = ds_from(np.zeros((50, 1, 2, 2), np.uint8), np.arange(50) % 10)
    a, b = BatchLoader(ds, 8, shuffle=True, seed=1), BatchLoader(ds, 8, shuffle=True, seed=1)
    assert torch.equal(a.indices(), b.indices())
    assert sorted(a.indices().tolist()) == list(range(50)) and a.indices().tolist() != list(range(50))
    first = a.indices()
    assert torch.equal(torch.cat([y for _, y in a]), ds.labels[first])
    a.set_epoch(1)
    assert not torch.equal(a.indices(), first) and sorted(a.indices().tolist()) == list(range(50))
    a.set_epoch(0)
    assert torch.equal(a.indices(), first)
    assert not torch.equal(BatchLoader(ds, 8, shuffle=True, seed=2).indices(), first)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 40),
    world=st.integers(1, 5),
    batch=st.integers(1, 7),
    drop_last=st.booleans(),
    shuffle=st.booleans(),
)
def test_loader_sharding_gives_equal_batches_and_covers_the_data(n, world, batch, drop_last, shuffle):
    ds = ds_from(np.zeros((n, 1, 2, 2), np.uint8), np.arange(n) % 10)
    loaders = [
        BatchLoader(ds, batch, shuffle=shuffle, seed=7, rank=r, world_size=world, drop_last=drop_last)
        for r in range(world)
    ]
    lengths = {len(ld) for ld in loaders}
    assert len(lengths) == 1  # every rank steps the same number of times
    per_rank = [ld.indices().tolist() for ld in loaders]
    for ld, idx in zip(loaders, per_rank):
        assert len(list(ld)) == len(ld)
        assert sum(len(y) for _, y in ld) == len(idx)
    flat = [i for idx in per_rank for i in idx]
    if drop_last:
        assert len(flat) == len(set(flat))  # truncation never duplicates
        assert len(flat) == world * ((n // world) // batch) * batch
    else:
        assert set(flat) == set(range(n))  # padding never loses a sample
        assert len(flat) == world * -(-n // world) and len(flat) - n < world


def _padded_windows(img: torch.Tensor, pad: int) -> list[torch.Tensor]:
    padded = torch.nn.functional.pad(img, (pad, pad, pad, pad))
    h, w = img.shape[-2:]
    out = []
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            win = padded[..., dy : dy + h, dx : dx + w]
            out += [win, win.flip(-1)]
    return out


def test_loader_augments_only_32x32_rgb_and_crops_are_shifted_windows():
    rng = np.random.default_rng(0)
    rgb = rng.integers(1, 256, (12, 3, 32, 32), dtype=np.uint8)  # no zeros: padding is recognisable
    ds = ds_from(rgb, np.arange(12) % 10)
    loader = BatchLoader(ds, 6, shuffle=True, augment=True, seed=3)
    idx = loader.indices()
    x = torch.cat([b[0] for b in loader])
    assert x.shape == (12, 3, 32, 32) and 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    changed = 0
    for out, i in zip(x, idx):
        original = ds.images[i].float() / 255
        assert any(torch.equal(out, w) for w in _padded_windows(original, 4)), int(i)
        changed += not torch.equal(out, original)
    assert changed >= 6  # augmentation really happens
    again = torch.cat([b[0] for b in BatchLoader(ds, 6, shuffle=True, augment=True, seed=3)])
    assert torch.equal(x, again)  # and reproducibly

    gray = ds_from(rng.integers(0, 256, (6, 1, 28, 28), dtype=np.uint8), np.arange(6))
    plain = torch.cat([b[0] for b in BatchLoader(gray, 6, augment=True)])
    assert torch.equal(plain, gray.images.float() / 255)  # digits are never flipped or cropped


# -------------------------------------------------------------------------------------------- transforms


def test_random_crop_flip_windows_are_exact_and_every_offset_occurs():
    h = w = 6
    base = torch.arange(1, 3 * h * w + 1, dtype=torch.float32).reshape(1, 3, h, w)
    x = base.repeat(600, 1, 1, 1)
    out = transforms.random_crop_flip(x, padding=1, generator=torch.Generator().manual_seed(0))
    windows = _padded_windows(base[0], 1)
    seen = set()
    for img in out:
        matches = [k for k, win in enumerate(windows) if torch.equal(img, win)]
        assert len(matches) == 1
        seen.add(matches[0])
    assert seen == set(range(18))  # 9 offsets × {flip, no flip}, all reachable
    only_flip = transforms.random_crop_flip(x[:50], padding=0, generator=torch.Generator().manual_seed(1))
    flipped = [torch.equal(o, base[0].flip(-1)) for o in only_flip]
    assert all(f or torch.equal(o, base[0]) for f, o in zip(flipped, only_flip)) and 10 < sum(flipped) < 40


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(1, 6),
    c=st.integers(1, 3),
    h=st.integers(1, 9),
    w=st.integers(1, 9),
    pad=st.integers(0, 4),
    seed=st.integers(0, 2**31 - 1),
)
def test_random_crop_flip_keeps_shape_dtype_and_range(n, c, h, w, pad, seed):
    x = torch.rand(n, c, h, w, generator=torch.Generator().manual_seed(seed))
    out = transforms.random_crop_flip(x, padding=pad, generator=torch.Generator().manual_seed(seed))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert float(out.min()) >= 0.0 and float(out.max()) <= float(x.max())
    assert torch.equal(
        out, transforms.random_crop_flip(x, padding=pad, generator=torch.Generator().manual_seed(seed))
    )
    u8 = (x * 255).to(torch.uint8)
    assert transforms.random_crop_flip(u8, padding=pad).dtype == torch.uint8
    # every output value exists in the input or is padding
    allowed = set(x.flatten().tolist()) | {0.0}
    assert set(out.flatten().tolist()) <= allowed


def test_random_crop_flip_rejects_bad_input():
    with pytest.raises(InputError):
        transforms.random_crop_flip(torch.zeros(3, 4, 4))
    with pytest.raises(InputError):
        transforms.random_crop_flip(torch.zeros(1, 3, 4, 4), padding=-1)


# ------------------------------------------------------------------------------------------------- slow


@pytest.mark.slow
@pytest.mark.skipif(not CIFAR_TARBALL.is_file(), reason="../shared/data/cifar10-jpeg.tar.gz not present")
def test_real_cifar10_jpeg_test_split():
    """Decodes 10k JPEGs on the first run; later runs hit the default cache ($QROBUST_CACHE or ~/.cache)."""
    ds = load_dataset("cifar10", "test", root=CIFAR_TARBALL)
    assert ds.images.shape == (10000, 3, 32, 32) and ds.info.display_name == "CIFAR-10 (JPEG)"
    assert np.array_equal(np.bincount(ds.labels.numpy()), [1000] * 10)
    assert set(ds.labels[:100].tolist()) == set(range(10))  # interleaved: a small prefix has every class
    mean = (ds.images.double() / 255).mean(dim=(0, 2, 3))
    assert torch.allclose(mean, torch.tensor(ds.info.mean, dtype=torch.float64), atol=0.02)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), padding=st.integers(0, 3), n=st.integers(1, 5))
def test_crop_flip_params_reproduce_the_augmentation_and_paste_inverts_crop(seed, padding, n):
    from qrobust.data.transforms import crop_flip_params, random_crop_flip

    x = torch.rand(n, 2, 5, 6, generator=torch.Generator().manual_seed(seed))
    out, cf = random_crop_flip(x, padding, torch.Generator().manual_seed(seed), return_params=True)
    again = crop_flip_params(n, padding, torch.Generator().manual_seed(seed))
    assert torch.equal(cf.offsets, again.offsets) and torch.equal(cf.flip, again.flip)
    assert torch.equal(out, cf.crop(cf.pad(x)))
    frame = torch.rand(n, 2, 5 + 2 * padding, 6 + 2 * padding)
    views = torch.rand(n, 2, 5, 6)
    pasted = cf.paste(frame, views)
    assert torch.equal(cf.crop(pasted), views)  # paste writes exactly where crop reads
    untouched = cf.paste(torch.zeros_like(frame), torch.ones_like(views)) == 0
    assert torch.equal(pasted[untouched], frame[untouched])  # and nowhere else
    assert int((~untouched).sum()) == n * 2 * 5 * 6
