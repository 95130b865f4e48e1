"""The model zoo: every committed card holds (its clean accuracy re-measured on real data), cards are checked
field by field, ``zoo:NAME`` resolves wherever a checkpoint is loaded, and the CLI writes cards and the table."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch

import qrobust
from qrobust import zoo
from qrobust.cli import main
from qrobust.data import load_dataset
from qrobust.errors import CheckpointError, ConfigError
from qrobust.models import build_model
from qrobust.training import accuracy, fit

ROOT = Path(__file__).resolve().parents[1]
ZOO = ROOT / "zoo"
DATA = ROOT.parent / "shared" / "data"
COMMITTED = sorted(p.stem for p in ZOO.glob("*.json"))
#: the clean accuracy re-measured here may differ from the card's by this much (points): the same images and
#: weights give the same predictions on a CPU; the slack is for other BLAS builds flipping a borderline logit
CLEAN_TOLERANCE = 0.5


def test_the_repository_zoo_has_an_entry():
    assert COMMITTED, "zoo/ holds no card"
    assert zoo.repo_zoo() == ZOO


@pytest.mark.parametrize("name", COMMITTED)
def test_each_committed_card_is_valid_and_its_clean_accuracy_holds_on_real_data(name, monkeypatch):
    monkeypatch.delenv(zoo.ENV, raising=False)
    card = zoo.read_card(ZOO / f"{name}.json")
    ckpt = ZOO / card["checkpoint"]
    # small enough to commit: a ResNet-20's float weights are 1.1 MB (0.27 M parameters), a digits CNN's 0.1 MB
    assert ckpt.stat().st_size < 1_500_000 and (ZOO / f"{name}.json").stat().st_size < 100_000
    model = qrobust.load(f"zoo:{name}")
    meta = model.qrobust_meta
    assert meta["metadata"]["dataset"] == card["dataset"]
    assert (meta.get("arch") or {}).get("name") == card["architecture"]
    spec = meta.get("spec")  # a float model carries none
    assert (str(qrobust.QuantSpec.from_dict(spec)) if spec else "float") == card["spec"]
    root = DATA if card["dataset"] != "digits" else None  # digits ship with scikit-learn
    if root is not None and not root.is_dir():
        pytest.skip(f"{card['dataset']} needs ../shared/data, which is not here")
    x, y = load_dataset(card["dataset"], "test", root=root).tensors(n=card["n_eval"])
    assert x.shape[0] == card["n_eval"]
    clean = 100 * accuracy(model, (x, y))
    assert abs(clean - card["clean_accuracy"]) <= CLEAN_TOLERANCE, (clean, card["clean_accuracy"])
    assert card["robust_accuracy"] < card["clean_accuracy"]


@pytest.fixture()
def card():
    return zoo.read_card(ZOO / f"{COMMITTED[0]}.json")


@pytest.mark.parametrize("field", list(zoo.CARD_FIELDS))
def test_a_card_without_a_required_field_is_refused_naming_it(card, field):
    bad = {k: v for k, v in card.items() if k != field}
    with pytest.raises(CheckpointError, match=f"field '{field}' is missing") as e:
        zoo.check_card(bad)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("field,value,needle", [
    ("robust_accuracy", 99.0, "robust_accuracy"),          # above clean
    ("robust_accuracy", 10.0, "worst case after the last attack"),
    ("clean_accuracy", "98", "clean_accuracy"),
    ("spec", "w9a4", "spec"),
    ("norm", "L1", "norm"),
    ("eps", 0, "eps"),
    ("n_eval", 3.5, "n_eval"),
    ("checkpoint", "other.safetensors", "checkpoint"),
    ("name", "Has Spaces", "name"),
    ("attacks", [], "attacks"),
])
def test_a_card_with_a_bad_field_is_refused_naming_it(card, field, value, needle):
    bad = copy.deepcopy(card)
    bad[field] = value
    with pytest.raises(CheckpointError, match=needle):
        zoo.check_card(bad)
    bad = copy.deepcopy(card)
    bad["attacks"][0].pop("settings")
    with pytest.raises(CheckpointError, match=r"attacks\[0\]\.settings"):
        zoo.check_card(bad)


def test_a_card_must_match_its_file_name(card, tmp_path):
    (tmp_path / "other.json").write_text(json.dumps(card))
    with pytest.raises(CheckpointError, match="must match its file name other.json"):
        zoo.read_card(tmp_path / "other.json")


def test_zoo_names_resolve_from_another_folder_and_unknown_names_list_the_available(card, tmp_path, monkeypatch):
    name = card["name"]
    shutil.copy(ZOO / f"{name}.json", tmp_path)
    shutil.copy(ZOO / card["checkpoint"], tmp_path)
    monkeypatch.setenv(zoo.ENV, str(tmp_path))
    assert zoo.resolve(f"zoo:{name}") == tmp_path / card["checkpoint"]
    with pytest.raises(CheckpointError, match=f"no zoo entry 'nope' in {tmp_path}; available: {name}"):
        qrobust.load("zoo:nope")
    (tmp_path / card["checkpoint"]).unlink()
    with pytest.raises(CheckpointError, match="not in"):
        qrobust.load(f"zoo:{name}")
    assert zoo.resolve(f"zoo:{name}", ZOO) == ZOO / card["checkpoint"]  # an explicit folder wins
    monkeypatch.setenv(zoo.ENV, str(tmp_path / "missing"))
    with pytest.raises(CheckpointError, match=r"does not exist.*\$QROBUST_ZOO"):
        qrobust.load(f"zoo:{name}")


def test_an_installed_package_outside_the_repository_says_where_it_looked(monkeypatch):
    monkeypatch.delenv(zoo.ENV, raising=False)
    monkeypatch.setattr(zoo, "repo_zoo", lambda: None)
    with pytest.raises(CheckpointError, match=r"not from a checkout.*looked for.*set QROBUST_ZOO=") as e:
        qrobust.load("zoo:anything")
    assert str(Path(zoo.__file__).resolve().parent) in str(e.value)


def test_the_table_has_one_row_per_card(card, capsys):
    table = zoo.markdown_table([card])
    lines = table.splitlines()
    assert len(lines) == 3 and lines[0].count("|") == lines[1].count("|") == lines[2].count("|")
    assert f"`zoo:{card['name']}`" in lines[2] and f"{card['robust_accuracy']:.2f}" in lines[2]
    # an evaluation flag is shown beside the number it qualifies, never dropped
    flagged = zoo.markdown_table([{**card, "flags": ["not_converged"]}]).splitlines()[2]
    assert flagged.rstrip().endswith("| not_converged |")
    assert zoo.markdown_table([{**card, "flags": []}]).splitlines()[2].rstrip().endswith("| none |")
    assert main(["zoo", "table"]) == 0
    assert capsys.readouterr().out == zoo.markdown_table(zoo.cards())


def test_card_from_report_refuses_a_sweep_and_a_missing_training_time():
    rep = {"results": [{"eps": 0.1}, {"eps": 0.2}]}
    with pytest.raises(ConfigError, match="one ε"):
        zoo.card_from_report(rep, {}, name="m", command="qrobust train")
    with pytest.raises(ConfigError, match="lower case"):
        zoo.card_from_report(rep, {}, name="Bad Name", command="qrobust train")
    with pytest.raises(ConfigError, match="training history"):
        zoo.card_from_report({"results": [{"eps": 0.1}]}, {"metadata": {}}, name="m", command="qrobust train")


def test_qrobust_zoo_card_writes_an_entry_that_eval_and_load_accept(tmp_path, monkeypatch, capsys):
    """A tiny trained checkpoint → `qrobust zoo card` (quick suite) → the entry loads as zoo:NAME, its card
    holds the report's numbers, `qrobust eval zoo:NAME` runs, and a second card of that name needs --force."""
    torch.manual_seed(0)
    train = load_dataset("digits", "train")
    m = build_model("digits_cnn", in_channels=1, input_size=8, mean=train.info.mean, std=train.info.std)
    run = tmp_path / "run"
    fit(m, train, epochs=2, lr=0.05, device="cpu", out=run, metadata={"dataset": "digits"})
    folder = tmp_path / "zoo"
    args = ["zoo", "card", str(run), "--name", "tiny", "--command", "qrobust train --epochs 2", "--suite", "quick",
            "--n", "64", "--zoo", str(folder)]
    assert main(args) == 0
    card = zoo.read_card(folder / "tiny.json")
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert card["train_time_s"] == round(sum(r["epoch_time_s"] for r in history), 1)
    assert card["n_eval"] == 64 and card["spec"] == "float" and card["recipe"] == "ce"
    assert [a["label"] for a in card["attacks"]] == ["fgsm", "pgd-20"]
    assert card["robust_accuracy"] == card["attacks"][-1]["robust_accuracy"] <= card["clean_accuracy"]
    monkeypatch.setenv(zoo.ENV, str(folder))
    model = qrobust.load("zoo:tiny")
    x, y = load_dataset("digits", "test").tensors(n=64)
    assert round(100 * accuracy(model, (x, y)), 2) == card["clean_accuracy"]
    capsys.readouterr()
    assert main(["eval", "zoo:tiny", "--suite", "quick", "--n", "32", "--out", str(tmp_path / "ev"),
                 "--no-diagnostics"]) == 0
    assert json.loads((tmp_path / "ev" / "report.json").read_text())["n_examples"] == 32
    assert main(args) == 2
    assert "--force" in capsys.readouterr().err


def test_zoo_card_from_a_saved_evaluation_takes_its_numbers_and_refuses_another_checkpoint(tmp_path, capsys):
    """A long evaluation runs as `qrobust eval --out DIR` (resumable); `zoo card --report DIR` makes the card from
    it without evaluating again — the card's numbers are the report's — and refuses evaluation flags beside it
    and a report of another checkpoint (its clean per-sample results differ)."""
    train = load_dataset("digits", "train")
    runs = {}
    for name, epochs in (("a", 2), ("b", 1)):
        torch.manual_seed(0)
        m = build_model("digits_cnn", in_channels=1, input_size=8, mean=train.info.mean, std=train.info.std)
        runs[name] = tmp_path / name
        fit(m, train, epochs=epochs, lr=0.05, device="cpu", out=runs[name], metadata={"dataset": "digits"})
    ev = tmp_path / "ev"
    assert main(["eval", str(runs["a"]), "--suite", "quick", "--n", "64", "--out", str(ev), "--no-diagnostics"]) == 0
    report = json.loads((ev / "report.json").read_text())
    folder = tmp_path / "zoo"
    base = ["zoo", "card", "--name", "tiny", "--command", "qrobust train --epochs 2", "--zoo", str(folder)]
    capsys.readouterr()
    assert main([*base, str(runs["a"]), "--report", str(ev), "--suite", "quick"]) == 2
    assert "drop --suite" in capsys.readouterr().err
    assert main([*base, str(runs["b"]), "--report", str(ev)]) == 2
    err = capsys.readouterr().err
    assert "not of this checkpoint" in err and len(err.strip().splitlines()) == 1
    assert not (folder / "tiny.json").exists()
    assert main([*base, str(runs["a"]), "--report", str(ev)]) == 0
    card = zoo.read_card(folder / "tiny.json")
    assert card["n_eval"] == 64 and card["suite"] == "quick"
    assert card["clean_accuracy"] == round(100 * report["clean_acc"], 2)
    assert card["robust_accuracy"] == round(100 * report["results"][0]["robust_accuracy"], 2)
    assert card["eval_time_s"] == round(report["wall_time_s"], 1)


def test_a_zoo_name_gives_a_plain_default_output_folder():
    from qrobust.cli import _out_stem

    assert _out_stem("zoo:digits-a.b") == "digits-a.b"
    assert _out_stem("runs/m.safetensors") == "runs/m"


README_MARKERS = ("<!-- zoo-table -->", "<!-- /zoo-table -->")


def test_the_readme_zoo_table_is_the_generated_one():
    """The README's zoo table is `qrobust zoo table`'s output, between its two markers."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start, end = README_MARKERS
    if start not in text:
        pytest.skip("README.md has no zoo table yet (between <!-- zoo-table --> and <!-- /zoo-table -->)")
    table = text.split(start, 1)[1].split(end, 1)[0].strip()
    assert table == zoo.markdown_table(zoo.cards(ZOO)).strip(), "regenerate it: qrobust zoo table"
