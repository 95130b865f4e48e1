"""The papers' experiments as functions over the flow data → model → quantize → fit → evaluate."""
