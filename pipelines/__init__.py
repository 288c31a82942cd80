"""Amnesis' orchestration layer: Ray, MLflow, the `unlearn` command line, and `forget(...)`,
a whole deletion request from Python (`pipelines.api`)."""


def __getattr__(name: str):
    # `pipelines.forget` without importing torch and Ray for every `unlearn --version`
    if name in ("forget", "ForgetResult"):
        from pipelines import api

        return getattr(api, name)
    raise AttributeError(f"module 'pipelines' has no attribute {name!r}")
