"""Transfer across precisions, gradient alignment and quantization value shift (Bernhard et al.'s measures)."""

from __future__ import annotations

import copy

import pytest
import torch

from qrobust.analysis import gradient_alignment, transfer_matrix, value_shift
from qrobust.analysis.transferability import TransferMatrix
from qrobust.attacks import PGD
from qrobust.data import load_dataset
from qrobust.errors import ConfigError
from qrobust.models import build_model
from qrobust.quant import quantize
from qrobust.training import fit


@pytest.fixture(scope="module")
def family():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    m = build_model("digits_cnn", in_channels=1, input_size=8, mean=train.info.mean, std=train.info.std,
                    activation="relu6")
    fit(m, train, epochs=8, lr=0.05)
    models = {"float": m.eval()}
    for b in ("w8a8", "w2a2"):
        q = quantize(m, b)
        fit(q, train, epochs=2, lr=0.01)
        models[b] = q.eval()
    x, y = test.tensors(n=96)
    yield models, x, y
    torch.set_num_threads(old)


def test_diagonal_is_the_white_box_attack_and_cells_use_common_points(family, tmp_path):
    models, x, y = family
    tm = transfer_matrix(models, x, y, eps=0.1, attack_kwargs={"steps": 10})
    for name, m in models.items():
        with torch.no_grad():
            ok = m(x).argmax(1) == y
        adv = PGD(m, eps=0.1, steps=10, seed=0, early_stop=False)(x, y)
        with torch.no_grad():
            robust = (m(adv).argmax(1) == y)[ok].float().mean().item()
        assert tm.value(name, name) == pytest.approx(robust)
        assert tm.n[tm.names.index(name)][tm.names.index(name)] == int(ok.sum())
    i, j = tm.names.index("float"), tm.names.index("w2a2")
    with torch.no_grad():
        both = (models["float"](x).argmax(1) == y) & (models["w2a2"](x).argmax(1) == y)
    assert tm.n[i][j] == int(both.sum())
    assert tm.success[i][j] == pytest.approx(1 - tm.robust[i][j])
    assert TransferMatrix.from_dict(tm.to_dict()) == tm
    assert tm.plot(tmp_path / "m.png").stat().st_size > 1000


def test_a_model_transfers_perfectly_to_its_copy(family):
    models, x, y = family
    twin = copy.deepcopy(models["w2a2"])
    tm = transfer_matrix({"a": models["w2a2"], "b": twin}, x, y, eps=0.1, attack_kwargs={"steps": 5})
    assert tm.value("a", "b") == pytest.approx(tm.value("a", "a"))
    cos = gradient_alignment(models["w2a2"], twin, x, y)
    assert torch.allclose(cos[~cos.isnan()], torch.ones(int((~cos.isnan()).sum())), atol=1e-5)


def test_alignment_falls_with_precision_and_native_gradients_are_nan(family):
    models, x, y = family
    c8 = gradient_alignment(models["float"], models["w8a8"], x, y).nanmedian()
    c2 = gradient_alignment(models["float"], models["w2a2"], x, y).nanmedian()
    assert c8 > c2  # the lower the precision, the further its gradients turn from the float model's
    native = gradient_alignment(models["float"], models["w2a2"], x, y, gradients="native")
    assert bool(native.isnan().all())  # rounding's literal gradient is zero: no direction at all


def test_value_shift_grows_as_bits_fall(family):
    models, x, y = family
    adv = PGD(models["w8a8"], eps=0.1, steps=5, seed=0)(x, y)
    r8 = value_shift(models["w8a8"], x, adv)
    r2 = value_shift(models["w2a2"], x)
    assert all(r["clean_vs_adv"] is not None for r in r8) and all(r["clean_vs_adv"] is None for r in r2)
    assert sum(r["rel_l2_float_vs_quant"] for r in r2) > sum(r["rel_l2_float_vs_quant"] for r in r8)
    with pytest.raises(ConfigError, match="no quantized activations"):
        value_shift(models["float"], x)
