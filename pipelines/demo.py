"""The quick-start: the main job on the embedded `digits` data, start to finish.

train the original model -> build its importance store on a local Ray cluster -> forget one
class with the default PTN search on Ray Tune, compared with retraining from scratch ->
record everything in MLflow -> print one table. Every artefact lands in a fresh directory
under `demo-output/`; MLflow uses the usual store (`MLFLOW_TRACKING_URI` or ./mlflow.db).
"""

from __future__ import annotations

import json
import time
from datetime import datetime
from pathlib import Path

from pipelines.tracking import tracking_uri

FORGET_SPEC = "class:3"
MODEL_NAME = "digits-demo"


def run_demo(root: str = "demo-output", quiet: bool = False) -> dict:
    from pipelines.cli import main as cli

    started = time.perf_counter()
    out = Path(root) / datetime.now().strftime("%Y%m%d-%H%M%S")
    flags = ["--quiet"] if quiet else []
    model, store, run = out / "original", out / "importance", out / "forget-class-3"

    print(f"[1/3] training the original model on digits -> {model}", flush=True)
    _check(cli([*flags, "train", "--data", "digits", "--out", str(model)]))
    print(f"[2/3] importance store on a local Ray cluster (2 workers) -> {store}", flush=True)
    _check(cli([*flags, "importance", "--model", str(model), "--data", "digits", "--out", str(store),
                "--workers", "2", "--kind", "fisher"]))
    print(f"[3/3] deletion request {FORGET_SPEC}: PTN search on Ray Tune, compared with retraining -> {run}",
          flush=True)
    _check(cli([*flags, "search", "--model", str(model), "--data", "digits", "--forget", FORGET_SPEC,
                "--importance", str(store), "--search", "ptn", "--compare-retrain",
                "--model-name", MODEL_NAME, "--out", str(run)]))

    report = json.loads((run / "report.json").read_text())
    print(f"\nMLflow store: {tracking_uri()}; browse the runs with `unlearn ui`")
    print(f"the request's report with plots: {run / 'report.md'}")
    print(f"all outputs in {out} ({time.perf_counter() - started:.0f} s)")
    return report


def _check(code: int) -> None:
    if code != 0:
        raise SystemExit(code)
