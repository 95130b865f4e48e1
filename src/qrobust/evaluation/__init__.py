"""Robustness evaluation: run an attack suite, keep the per-sample worst case, diagnose gradient masking.

The package holds three rooms: :mod:`~qrobust.evaluation.results` (the data model — :class:`RobustnessReport`,
:class:`EpsResult`, :class:`AttackResult`, the JSON format), :mod:`~qrobust.evaluation.suites` (which attacks:
named suites, custom lists, building an attack for an ε from what its class declares) and
:mod:`~qrobust.evaluation.runner` (:func:`evaluate` and the attack loop); the diagnostics it runs live in
:mod:`qrobust.analysis.diagnose`.

>>> report = evaluate(model, test_set, suite="quick", eps=8/255, n=1000)       # doctest: +SKIP
>>> report.clean_accuracy, report.robust_accuracy                               # doctest: +SKIP
>>> report.save("runs/eval")          # report.json, report.md, the accuracy plot   # doctest: +SKIP

**How the attacks are run.** Like AutoAttack's standard evaluation, the attacks of a suite run in order and
each attacks only the samples no earlier attack has broken, so the worst case over many attacks costs
little more than the first one. The headline ``robust_accuracy`` is the per-sample worst case: a sample
counts as robust only if the model classifies it correctly clean and after *every* attack. An attack run
on every clean-correct sample (``individual=True``, or an entry that the diagnostics need) also yields its
own robust accuracy; one run on the survivors only reports how many more samples it broke and the worst
case after it (``robust_accuracy_after``).

**ε sweeps.** ``eps`` may be a list; it is evaluated from the smallest ε up, and a sample broken at a
smaller ε counts as broken at every larger one (its adversarial example lies in the larger ball too) and is
not attacked again, so the headline accuracy never increases with ε.

**Suites** (``suite=``):

* ``"quick"`` — FGSM and PGD-20 (α = ε/4, random start); in L2 a one-step L2 gradient attack and PGD-L2-20.
  Both run on every sample (the diagnostics compare them), i.e. PGD also attacks the samples FGSM broke.
* ``"standard"`` — AutoAttack's standard recipe without FAB: APGD-CE (100 iterations), APGD-T (targeted
  DLR, 9 target classes, 100 iterations), Square (5,000 queries; ``n_queries=`` lowers it for CPU budgets).
* ``"quantized"`` — the standard white-box attacks with straight-through (``ste``) *and* float-surrogate
  gradients, then Square, SPSA (L∞ only; its own default budget) and — when ``parent=`` (the float model
  the quantized one was fine-tuned from) is given — a transfer attack (:class:`~qrobust.attacks.Transfer`):
  PGD-20 without early stopping on the parent, scored on the model.
* a custom list whose items are a registry name (``"pgd"``), a ``(name, kwargs)`` pair (``kwargs`` may
  carry ``"label"``, ``"individual"``, ``"black_box"``), an :class:`~qrobust.attacks.Attack` instance (used
  as built; its ε must match), or a factory such as an attack class or
  ``lambda model, **kw: PGD(model, steps=5, **kw)`` — called with ``eps=`` and, when it accepts them,
  ``seed=`` and ``gradients=`` (never handed to an attack whose class declares ``black_box = True``). The
  first attack of a custom list whose class is the diagnostics' FGSM reference and the first that is their
  PGD reference (:attr:`~qrobust.attacks.Attack.diagnostic_role`: FGSM; PGD and PGD-L2) run on every
  sample (the diagnostics compare them), the rest on the survivors.

``attack_kwargs={"label": {...}}`` overrides the settings of a suite entry by its label (e.g.
``{"apgd-ce": {"n_iter": 20}}``).

**Under torchrun** (``torchrun --nproc_per_node=N``, gloo on CPU, nccl on GPU) the work is sharded and the
report is the single-process one, on every rank (:mod:`~qrobust.evaluation.shard` says how and why the seeds
do not change); rank 0 writes.

**Diagnostics** (the checks: :mod:`qrobust.analysis.diagnostics`; what is measured for them:
:mod:`qrobust.analysis.diagnose`) run with every report unless ``diagnostics=False``;
they cost, on the first ``diagnostic_n`` samples (default 256): one input-gradient batch per gradient mode;
FGSM and PGD-k at each ε unless the suite already ran them on every sample; PGD-2k at each ε; and one PGD-k
at ``large_eps`` (L∞, default 0.5, whatever the threat model). k = 20 (``diagnostic_steps``) unless the
suite's own PGD entry says otherwise. Which attacks count as black-box there is what each attack's class
declares (:attr:`~qrobust.attacks.Attack.black_box`), unless a suite entry says ``"black_box"``.
"""

from qrobust.evaluation.deployed import DeployedComparison, deployed_suite, reverify
from qrobust.evaluation.results import FORMAT, AttackResult, EpsResult, RobustnessReport
from qrobust.evaluation.runner import THREAT_MODELS, evaluate
from qrobust.evaluation.suites import SUITES, SuiteEntry, suite_entries

__all__ = [
    "FORMAT",
    "SUITES",
    "THREAT_MODELS",
    "AttackResult",
    "DeployedComparison",
    "EpsResult",
    "RobustnessReport",
    "SuiteEntry",
    "deployed_suite",
    "evaluate",
    "reverify",
    "suite_entries",
]
