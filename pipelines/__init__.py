"""Amnesis' orchestration layer: Ray, MLflow and the `unlearn` command line."""
