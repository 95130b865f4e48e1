"""How we look inside a model: gradient-masking diagnostics (more analyses join here)."""

from qrobust.analysis.diagnostics import (
    CHECKS,
    Diagnostic,
    GradientHealth,
    any_flagged,
    check_black_box,
    check_convergence,
    check_large_eps,
    check_single_step,
    check_zero_gradients,
    gradient_health,
    input_gradients,
    not_checked,
)

__all__ = [
    "CHECKS",
    "Diagnostic",
    "GradientHealth",
    "any_flagged",
    "check_black_box",
    "check_convergence",
    "check_large_eps",
    "check_single_step",
    "check_zero_gradients",
    "gradient_health",
    "input_gradients",
    "not_checked",
]
