"""Benchmarks of lightning-fisher; run each as a module from the repository root:
``python -m benchmarks.<name> --help``. Shared helpers live in ``benchmarks.common``."""
