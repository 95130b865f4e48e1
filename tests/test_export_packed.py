"""Packed low-bit checkpoints: the size the bits say, and back to the same fake-quant function bit for bit."""

from __future__ import annotations

import math

import pytest
import torch

from qrobust import checkpoint
from qrobust.data import load_dataset
from qrobust.errors import CheckpointError, ConfigError
from qrobust.export.packed import load_packed, pack_bits, packed_size_report, save_packed, unpack_bits
from qrobust.models import build_model
from qrobust.quant import quantize
from qrobust.training import fit


@pytest.fixture(scope="module")
def digits():
    torch.manual_seed(0)
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    model = build_model("digits_cnn", in_channels=1, input_size=8)
    fit(model, train, epochs=2, lr=0.05, batch_size=64, seed=0)
    return model, train.tensors(256)[0], test.tensors()[0]


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 8])
def test_pack_roundtrip_and_length(bits):
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, (1001,), generator=g)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(1001 * bits / 8)
    assert torch.equal(unpack_bits(packed, bits, 1001), codes)


@pytest.mark.parametrize("spec", [
    "w4a4", "w2a2", "w8a8", "w1a1,act_scheme=sign,first_layer_bits=8,last_layer_bits=8",
    "w3a4,weight_scheme=lsq", "w4a4,weight_scheme=dorefa", "w4a4,weight_scheme=uniform,conv2=w2",
])
def test_packed_reloads_to_identical_outputs(digits, tmp_path, spec):
    model, calib, x = digits
    q = quantize(model, spec, calibrate=calib).eval()
    path = save_packed(q, tmp_path / "p.safetensors", dataset="digits")
    back = load_packed(path)
    with torch.no_grad():
        assert torch.equal(q(x), back(x))  # bit for bit, on the 359 test digits
    assert back.qrobust_spec == q.qrobust_spec and back.qrobust_meta["metadata"]["dataset"] == "digits"


def test_packed_size_is_what_the_bits_say(tmp_path):
    """small_cnn (421 k weights): 4 bits → half the bytes of 8 bits, 2 → a quarter, 1 → an eighth, plus a small
    float32 remainder (biases, scales) and the header."""
    model = build_model("small_cnn", in_channels=1, input_size=28)
    x = torch.rand(8, 1, 28, 28)
    sizes = {}
    for bits in (8, 4, 2, 1):
        q = quantize(model, f"w{bits}a{max(bits, 2)}", calibrate=x)
        path = save_packed(q, tmp_path / f"w{bits}.safetensors")
        rep = packed_size_report(q, path)
        n_weights = sum(m.weight.numel() for m in q.modules() if hasattr(m, "weight_bits"))
        assert rep["weight_bytes"] == sum(math.ceil(m.weight.numel() * bits / 8) for m in q.modules()
                                          if hasattr(m, "weight_bits"))
        assert rep["file_bytes"] <= bits * n_weights / 8 + rep["float32_bytes"] + 4096  # header + alignment
        sizes[bits] = rep["file_bytes"]
    assert sizes[4] / sizes[8] == pytest.approx(0.5, abs=0.02)
    assert sizes[2] / sizes[8] == pytest.approx(0.25, abs=0.02)
    assert sizes[1] / sizes[8] == pytest.approx(0.125, abs=0.02)


def test_packed_file_is_refused_by_plain_load_and_tampering_is_caught(digits, tmp_path):
    model, calib, _ = digits
    q = quantize(model, "w4a4", calibrate=calib).eval()
    path = save_packed(q, tmp_path / "p.safetensors")
    with pytest.raises(CheckpointError, match="load_packed"):
        checkpoint.load(path)
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256|corrupt"):
        load_packed(path)
    with pytest.raises(ConfigError, match="quantize"):
        save_packed(model, tmp_path / "f.safetensors")


def test_doctests_of_packing_and_diva():
    import doctest

    import qrobust.attacks.diva
    import qrobust.export.packed

    for module in (qrobust.export.packed, qrobust.attacks.diva):
        result = doctest.testmod(module)
        assert result.attempted > 0 and result.failed == 0
