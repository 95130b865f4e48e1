"""How models are made robust: training objectives and model-level tools."""

from qrobust.defenses.objectives import (
    OBJECTIVES,
    CrossEntropy,
    Objective,
    Sum,
    make_objective,
    register_objective,
    split_output,
)

__all__ = ["OBJECTIVES", "CrossEntropy", "Objective", "Sum", "make_objective", "register_objective", "split_output"]

from qrobust.defenses.orthogonality import OrthogonalityPenalty, dq_objective, orthogonality_error  # noqa: E402

register_objective("dq", dq_objective)
__all__ += ["OrthogonalityPenalty", "dq_objective", "orthogonality_error"]

from qrobust.defenses.adversarial import FgsmRS, PgdAT, Trades  # noqa: E402  (registers pgd-at, fgsm-rs, trades)
from qrobust.defenses.guards import OverfitGuard, co_detected  # noqa: E402
from qrobust.defenses.odgq import OdgQ  # noqa: E402  (registers odgq)

__all__ += ["FgsmRS", "OdgQ", "OverfitGuard", "PgdAT", "Trades", "co_detected"]
