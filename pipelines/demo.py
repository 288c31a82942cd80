"""The quick-start: the main job on the embedded `digits` data, start to finish.

train the original model -> build its importance store (in this process: 1,438 rows are under
`--ray-min-rows`) -> forget one class with the default PTN search on a local Ray cluster,
compared with retraining from scratch ->
record everything in MLflow -> print one table. Every artefact lands in a fresh directory
under `demo-output/`; MLflow uses the usual store (`MLFLOW_TRACKING_URI` or ./mlflow.db).
It calls the same request API as the `unlearn` commands.
"""

from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path

from pipelines.distributed import build_importance_store
from pipelines.options import ForgetOptions
from pipelines.progress import StepProgress
from pipelines.report import RequestReport
from pipelines.request import run_forget
from pipelines.summary import print_report
from pipelines.tracking import tracking_uri
from pipelines.train import store_summary, train_checkpoint

FORGET_SPEC = "class:3"
MODEL_NAME = "digits-demo"


def run_demo(root: str = "demo-output", quiet: bool = False) -> RequestReport:
    started = time.perf_counter()
    out = Path(root) / datetime.now().strftime("%Y%m%d-%H%M%S")
    model, store, run = out / "original", out / "importance", out / "forget-class-3"

    print(f"[1/3] training the original model on digits -> {model}", flush=True)
    print(train_checkpoint("digits", str(model), progress=not quiet))
    print(f"[2/3] importance store (1,438 rows: in this process, under --ray-min-rows) -> {store}", flush=True)
    meta = build_importance_store(model, "digits", store, workers=2, kind="fisher", progress=not quiet)
    print(store_summary(meta, str(store)))
    print(f"[3/3] deletion request {FORGET_SPEC}: PTN search on Ray, compared with retraining -> {run}",
          flush=True)
    options = ForgetOptions(importance_store=str(store), search="ptn", compare_retrain=True,
                            model_name=MODEL_NAME, show_progress=not quiet)
    with StepProgress("search steps", disable=quiet) as progress:
        report = run_forget(str(model), "digits", FORGET_SPEC, str(run), options, progress=progress.on_result)
    print_report(report, str(run))

    print(f"\nMLflow store: {tracking_uri()}; browse the runs with `unlearn ui`")
    print(f"the request's report with plots: {run / 'report.md'}")
    print(f"all outputs in {out} ({time.perf_counter() - started:.0f} s)")
    return report
