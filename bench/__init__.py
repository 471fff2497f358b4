"""Baton's benchmark suite: `python -m bench [--quick] [--json] [--only NAME ...]`.

Every figure is a ratio of two timings measured side by side in the same run (or, for cleanup,
seconds and storage calls), so that a noisy shared machine moves both sides together.
"""
