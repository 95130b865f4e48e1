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

from qrobust.analysis.amplification import (  # noqa: E402
    amplification,
    amplification_report,
    amplification_summary,
    amplification_sweep,
    plot_amplification,
    value_shift,
)
from qrobust.analysis.diagnose import DiagnosticSettings, diagnose  # noqa: E402
from qrobust.analysis.lipschitz import (  # noqa: E402
    conv_spectral_norm,
    format_lipschitz_table,
    lipschitz_bound,
    lipschitz_table,
    matrix_spectral_norm,
)
from qrobust.analysis.transferability import (  # noqa: E402
    TransferMatrix,
    gradient_alignment,
    plot_alignment,
    transfer_matrix,
)

__all__ += [
    "TransferMatrix",
    "gradient_alignment",
    "plot_alignment",
    "transfer_matrix",
    "value_shift",
    "DiagnosticSettings",
    "amplification",
    "amplification_report",
    "amplification_summary",
    "amplification_sweep",
    "conv_spectral_norm",
    "diagnose",
    "format_lipschitz_table",
    "lipschitz_bound",
    "lipschitz_table",
    "matrix_spectral_norm",
    "plot_amplification",
]
