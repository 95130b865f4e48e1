"""How models are made robust: training objectives and model-level tools.

Importing the package imports every built-in objective's module, so each is registered by name
(``make_objective("pgd-at", ...)``) whichever part of ``qrobust.defenses`` a caller imported.
"""

from qrobust.defenses.adversarial import AdversarialObjective, FgsmRS, PgdAT, Trades
from qrobust.defenses.ensemble import Ensemble, adaptive_suite
from qrobust.defenses.guards import OverfitGuard, co_detected
from qrobust.defenses.objectives import (
    OBJECTIVES,
    CrossEntropy,
    FunctionObjective,
    Objective,
    Sum,
    as_objective,
    make_objective,
    register_objective,
    split_output,
)
from qrobust.defenses.odgq import OdgQ
from qrobust.defenses.orthogonality import OrthogonalityPenalty, dq_objective, orthogonality_error
from qrobust.defenses.random_precision import RandomPrecision, RandomPrecisionTraining

__all__ = [
    "OBJECTIVES",
    "AdversarialObjective",
    "CrossEntropy",
    "Ensemble",
    "FgsmRS",
    "FunctionObjective",
    "Objective",
    "OdgQ",
    "OrthogonalityPenalty",
    "OverfitGuard",
    "PgdAT",
    "RandomPrecision",
    "RandomPrecisionTraining",
    "Sum",
    "Trades",
    "adaptive_suite",
    "as_objective",
    "co_detected",
    "dq_objective",
    "make_objective",
    "orthogonality_error",
    "register_objective",
    "split_output",
]
