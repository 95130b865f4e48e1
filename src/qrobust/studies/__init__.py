"""The papers' experiments as functions over the flow data → model → quantize → fit → evaluate.

:mod:`qrobust.studies.harness` holds what every study shares (settings, budgets, resumption, timing, paired
statistics, verdicts, figures, the report, the registry the CLI reads); each other module is one study's
science: :mod:`~qrobust.studies.dq` (Defensive Quantization), :mod:`~qrobust.studies.odgq` (robust QAT at
low cost), and :mod:`~qrobust.studies.demo` (``qrobust demo``, a quick DQ run).
"""

from qrobust.studies.harness import (
    SMALL_IMAGE_DATASETS,
    Option,
    Study,
    StudyContext,
    available_studies,
    get_study,
    override_budget,
    register_study,
    render_results,
    run_study,
    study_threads,
)

__all__ = [
    "SMALL_IMAGE_DATASETS", "Option", "Study", "StudyContext", "available_studies", "get_study",
    "override_budget", "register_study", "render_results", "run_study", "study_threads",
]
