"""The quick-start: the main job on the embedded `digits` data, start to finish.

train the original model -> build its importance store -> forget one class with the default
PTN search -> compare with `retrain` -> print one table. Every artefact lands in a fresh
directory under `demo-output/`.
"""

from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path

from pipelines.summary import format_table

FORGET_SPEC = "class:3"


def run_demo(root: str = "demo-output", quiet: bool = False) -> dict:
    from pipelines.cli import main as cli

    started = time.perf_counter()
    out = Path(root) / datetime.now().strftime("%Y%m%d-%H%M%S")
    flags = ["--quiet"] if quiet else []
    model, store, run, retrain = out / "original", out / "importance", out / "forget-class-3", out / "retrain"

    print(f"[1/4] training the original model on digits -> {model}")
    _check(cli([*flags, "train", "--data", "digits", "--out", str(model)]))
    print(f"[2/4] importance store over the training data -> {store}")
    _check(cli([*flags, "importance", "--model", str(model), "--data", "digits", "--out", str(store)]))
    print(f"[3/4] deletion request {FORGET_SPEC} with the default PTN search -> {run}")
    _check(cli([*flags, "forget", "--model", str(model), "--data", "digits", "--forget", FORGET_SPEC,
                "--importance", str(store), "--out", str(run)]))
    print(f"[4/4] baseline: retrain from scratch without the forgotten class -> {retrain}")
    _check(cli([*flags, "forget", "--model", str(model), "--data", "digits", "--forget", FORGET_SPEC,
                "--method", "retrain", "--out", str(retrain)]))

    import json

    unlearned = json.loads((run / "report.json").read_text())
    retrained = json.loads((retrain / "report.json").read_text())
    print()
    print(
        format_table(
            [
                ("original", unlearned["original_metrics"], None),
                (f"unlearned ({unlearned['method']})", unlearned["metrics"], unlearned["seconds"]["total"]),
                ("retrained", retrained["metrics"], retrained["seconds"]["total"]),
            ]
        )
    )
    print(f"\nall outputs in {out} ({time.perf_counter() - started:.0f} s)")
    return {"out": str(out), "unlearned": unlearned, "retrained": retrained}


def _check(code: int) -> None:
    if code != 0:
        raise SystemExit(code)
