"""Command-line entry points (``ttsr-train``, ``ttsr-infer``, ``ttsr-eval``, ``ttsr-convert``)."""
