"""Amnesis benchmarks: speed figures and the papers' experiments (see RESULTS.md)."""
