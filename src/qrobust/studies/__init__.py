"""The papers' experiments as functions over the flow data → model → quantize → fit → evaluate."""

#: datasets whose small images leave torch's intra-op parallelism little to split: studies on them run on one
#: thread ("auto"), which on a shared two-core machine was 3–6× faster than two
SMALL_IMAGE_DATASETS = ("digits", "mnist", "fashion-mnist")
