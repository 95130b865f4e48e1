"""Checkpoints: round trips, run folders, and every way a file can be bad → CheckpointError."""

from __future__ import annotations

import json
import os

import pytest
import torch

import qrobust
from qrobust import checkpoint
from qrobust.errors import CheckpointError
from qrobust.models import build_model
from qrobust.quant import QuantSpec, quantize


def _model():
    torch.manual_seed(0)
    return build_model("digits_cnn", in_channels=1, input_size=8, num_classes=10)


def test_roundtrip_float_is_exact_and_in_eval_mode(tmp_path):
    m = _model()
    path = checkpoint.save(m, tmp_path / "m.safetensors", dataset="digits", note={"a": [1, 2]})
    m2 = qrobust.load(path)
    assert not m2.training
    x = torch.rand(5, 1, 8, 8)
    m.eval()
    assert torch.equal(m(x), m2(x))
    assert m2.qrobust_meta["metadata"] == {"dataset": "digits", "note": {"a": [1, 2]}}
    assert m2.qrobust_meta["torch_version"] == torch.__version__


def test_roundtrip_quantized_rebuilds_the_quantizers(tmp_path):
    q = quantize(_model(), "w4a4").eval()
    checkpoint.save(q, tmp_path / "q.safetensors")
    q2 = qrobust.load(tmp_path / "q.safetensors")
    assert q2.qrobust_spec == q.qrobust_spec
    x = torch.rand(5, 1, 8, 8)
    assert torch.equal(q(x), q2(x))


def test_load_accepts_a_run_folder(tmp_path):
    m = _model()
    checkpoint.save(m, tmp_path / "run" / checkpoint.FINAL_NAME)
    assert isinstance(qrobust.load(tmp_path / "run"), torch.nn.Module)
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        qrobust.load(tmp_path)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        qrobust.load(tmp_path / "nope.safetensors")


def test_truncated_file(tmp_path):
    p = checkpoint.save(_model(), tmp_path / "m.safetensors")
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        qrobust.load(p)


def test_flipped_weight_byte_is_caught_by_the_digest(tmp_path):
    p = checkpoint.save(_model(), tmp_path / "m.safetensors")
    data = bytearray(p.read_bytes())
    data[-3] ^= 0xFF  # inside the last tensor's bytes
    p.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256"):
        qrobust.load(p)


def test_pickle_file_is_refused_not_unpickled(tmp_path):
    p = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(2)}, p)
    with pytest.raises(CheckpointError):
        qrobust.load(p)


def test_plain_safetensors_without_metadata(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(CheckpointError, match="not a qrobust checkpoint"):
        qrobust.load(tmp_path / "x.safetensors")


def test_mismatched_architecture(tmp_path):
    p = checkpoint.save(_model(), tmp_path / "m.safetensors")
    tensors, meta = checkpoint.read_tensors(p)
    meta = {k: v for k, v in meta.items() if k not in ("format", "qrobust_version", "torch_version", "sha256")}
    meta["arch"] = {"name": "digits_cnn", "kwargs": {**meta["arch"]["kwargs"], "num_classes": 7}}
    checkpoint.save_tensors(tmp_path / "bad.safetensors", tensors, meta)
    with pytest.raises(CheckpointError, match="does not match"):
        qrobust.load(tmp_path / "bad.safetensors")


def test_unknown_architecture(tmp_path):
    p = checkpoint.save(_model(), tmp_path / "m.safetensors")
    tensors, meta = checkpoint.read_tensors(p)
    checkpoint.save_tensors(tmp_path / "bad.safetensors", tensors, {"arch": {"name": "nonet", "kwargs": {}}})
    with pytest.raises(CheckpointError, match="cannot rebuild"):
        qrobust.load(tmp_path / "bad.safetensors")


def test_model_without_arch_saves_and_needs_a_skeleton_to_load(tmp_path):
    """A model of one's own (no qrobust_arch) saves; loading it from the path alone says how to load it."""
    p = checkpoint.save(torch.nn.Linear(2, 2), tmp_path / "x.safetensors")
    assert checkpoint.read_metadata(p)["class"] == "torch.nn.modules.linear.Linear"
    with pytest.raises(CheckpointError, match=r"model of your own .*model=Linear\(\.\.\.\)"):
        qrobust.load(p)
    assert isinstance(qrobust.load(p, model=torch.nn.Linear(2, 2)), torch.nn.Linear)


def test_failed_write_leaves_the_old_file_and_no_temp(tmp_path, monkeypatch):
    p = checkpoint.save(_model(), tmp_path / "m.safetensors")
    before = p.read_bytes()

    import safetensors.torch as st

    def broken(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(st, "save_file", broken)
    with pytest.raises(OSError):
        checkpoint.save(_model(), p)
    assert p.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["m.safetensors"]


def test_metadata_must_be_json(tmp_path):
    with pytest.raises(CheckpointError, match="JSON"):
        checkpoint.save(_model(), tmp_path / "m.safetensors", bad=object())
    assert not (tmp_path / "m.safetensors").exists()


def test_read_metadata_is_plain_json(tmp_path):
    p = checkpoint.save(_model(), tmp_path / "m.safetensors", dataset="digits")
    meta = checkpoint.read_metadata(p)
    json.dumps(meta)
    assert meta["arch"]["name"] == "digits_cnn"


def test_old_checkpoint_with_the_ste_spec_key_still_loads(tmp_path):
    """Checkpoints written before ``ste`` became ``sign_grad`` keep loading, with the same function."""
    spec = QuantSpec.parse("w1a1,act_scheme=sign,sign_grad=clipped,first_layer_bits=8", overrides={"fc2": "w1"})
    q = quantize(_model(), spec).eval()
    checkpoint.save(q, tmp_path / "new.safetensors")
    tensors, meta = checkpoint.read_tensors(tmp_path / "new.safetensors")
    old_spec = {("ste" if k == "sign_grad" else k): v for k, v in meta["spec"].items()}
    old_spec["name"] = "w1a1,act_scheme=sign,ste=clipped,first_layer_bits=8"
    old_spec["overrides"] = {"fc2": {"weight_bits": 1, "ste": "clipped"}}
    doc = {k: v for k, v in meta.items() if k not in ("format", "qrobust_version", "torch_version", "sha256")}
    checkpoint.save_tensors(tmp_path / "old.safetensors", tensors, {**doc, "spec": old_spec})
    old = qrobust.load(tmp_path / "old.safetensors")
    assert old.qrobust_spec["sign_grad"] == "clipped" and "ste" not in old.qrobust_spec
    assert old.qrobust_spec["overrides"] == {"fc2": {"weight_bits": 1, "sign_grad": "clipped"}}
    x = torch.rand(5, 1, 8, 8)
    assert torch.equal(q(x), old(x))


def test_a_changed_header_byte_is_caught_by_the_header_digest(tmp_path):
    """weight_bits 4 → 2 in the file's JSON header would load as a different model: it is an error."""
    p = checkpoint.save(quantize(_model(), "w4a4"), tmp_path / "q.safetensors")
    data = p.read_bytes()
    assert data.count(b'\\"weight_bits\\": 4') == 1  # the JSON document sits escaped inside the header
    p.write_bytes(data.replace(b'\\"weight_bits\\": 4', b'\\"weight_bits\\": 2'))
    with pytest.raises(CheckpointError, match=r"metadata \(header\) does not match its recorded SHA-256"):
        qrobust.load(p)
    with pytest.raises(CheckpointError, match="header"):
        checkpoint.read_metadata(p)


def test_header_digest_is_canonical_json(tmp_path):
    p = checkpoint.save(_model(), tmp_path / "m.safetensors", b=1, a={"y": 2, "x": [1.5, None]})
    meta = checkpoint.read_metadata(p)
    assert meta["format"] == "qrobust-checkpoint/2" and len(meta["header_sha256"]) == 64
    body = {k: v for k, v in meta.items() if k != "header_sha256"}
    import hashlib

    text = json.dumps(body, sort_keys=True, separators=(",", ":"))
    assert hashlib.sha256(text.encode()).hexdigest() == meta["header_sha256"]


def test_a_format_1_checkpoint_still_loads_with_a_note(tmp_path, caplog):
    """Files of earlier versions (digest over the tensors only) keep loading; a logged note says so."""
    import logging

    from safetensors.torch import save_file

    m = _model().eval()
    tensors = {k: v.contiguous() for k, v in m.state_dict().items()}
    doc = {"format": "qrobust-checkpoint/1", "qrobust_version": "0.1.0", "torch_version": torch.__version__,
           "sha256": checkpoint._digest(tensors), "arch": m.qrobust_arch, "spec": None, "metadata": {}}  # fmt: skip
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata={"qrobust": json.dumps(doc)})
    with caplog.at_level(logging.INFO, logger="qrobust.checkpoint"):
        old = qrobust.load(tmp_path / "old.safetensors")
    assert "not covered by a digest" in caplog.text
    x = torch.rand(3, 1, 8, 8)
    assert torch.equal(old(x), m(x))
    # its tensors are still checked
    tensors["fc2.bias"] = tensors["fc2.bias"] + 1
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata={"qrobust": json.dumps(doc)})
    with pytest.raises(CheckpointError, match="weights do not match"):
        qrobust.load(tmp_path / "bad.safetensors")
