"""A precision-diverse voting ensemble looks robust to a naive attack and is broken by the adaptive one."""

from __future__ import annotations

import pytest
import torch

import qrobust
from qrobust.data import load_dataset
from qrobust.defenses import Ensemble, adaptive_suite
from qrobust.errors import ConfigError
from qrobust.models import build_model
from qrobust.training import fit


@pytest.fixture(scope="module")
def empir():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")

    def mk():
        return build_model("digits_cnn", in_channels=1, input_size=8, mean=train.info.mean, std=train.info.std,
                           activation="relu6")

    members = {}
    for i, spec in enumerate(("float", "w4a2", "w2a2")):
        torch.manual_seed(i)
        m = mk() if spec == "float" else qrobust.quantize(mk(), spec)
        fit(m, train, epochs=8, lr=0.05)
        members[spec] = m.eval()
    yield members, test.tensors(n=96)
    torch.set_num_threads(old)


def test_combinations_and_views_share_members(empir):
    members, (x, y) = empir
    probs = Ensemble(members, combine="probs")
    with torch.no_grad():
        mean = torch.stack([m(x).softmax(1) for m in members.values()]).mean(0)
        assert torch.allclose(probs(x).exp(), mean, atol=1e-6)
        votes = Ensemble(members, combine="vote")(x)
        expected = torch.stack([torch.nn.functional.one_hot(m(x).argmax(1), 10) for m in members.values()]).sum(0)
        assert torch.equal(votes.floor(), expected.float())  # counts, plus a tie-break below one vote
    assert probs.view("logits").models[0] is members["float"]
    with pytest.raises(ConfigError, match="combine must be one of"):
        Ensemble(members, combine="max")
    with pytest.raises(ConfigError, match="at least two"):
        Ensemble({"a": members["float"]})


def test_vote_masks_gradients_and_the_adaptive_suite_sees_through_it(empir):
    members, data = empir
    ens = Ensemble(members, combine="vote").eval()
    naive = qrobust.evaluate(ens, data, eps=0.1, suite=["fgsm", ("pgd", {"steps": 10})], diagnostic_n=32,
                             diagnostic_steps=5)
    assert "zero_gradients" in {d.name for d in naive.flagged}  # the vote has no gradient: flagged, not trusted
    adaptive = qrobust.evaluate(ens, data, eps=0.1, suite=adaptive_suite(ens, n_iter=10, n_queries=100),
                                diagnostics=False)
    labels = [a.label for a in adaptive.result().attacks]
    assert labels[:2] == ["apgd-ce[probs]", "apgd-t[probs]"] and "transfer[w2a2]" in labels and "square" in labels
    assert adaptive.robust_accuracy < naive.robust_accuracy - 0.2


def test_an_ensemble_saves_and_loads_from_the_path_alone(empir, tmp_path):
    members, (x, y) = empir
    ens = Ensemble(members, combine="vote").eval()
    qrobust.save(ens, tmp_path / "ens.safetensors")
    back = qrobust.load(tmp_path / "ens.safetensors")
    assert isinstance(back, Ensemble) and back.combine == "vote" and back.names == ens.names
    assert back.members["w2a2"].qrobust_spec == members["w2a2"].qrobust_spec  # members keep their precisions
    with torch.no_grad():
        assert torch.equal(back(x), ens(x))


def test_a_composite_record_naming_foreign_code_is_refused(tmp_path):
    from qrobust.checkpoint import _build_composite
    from qrobust.errors import CheckpointError

    with pytest.raises(CheckpointError, match="outside qrobust"):
        _build_composite({"class": "os.system"})
