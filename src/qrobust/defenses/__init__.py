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
