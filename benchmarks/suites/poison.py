"""The poison suite (docs/methods.md#benchmark-tasks): heal a backdoor from its identified rows.

`--poison-rate` of the training rows get the trigger and label 0; one original model per
`--seeds`; for each `--identified` share the identified rows are the forget set. The healed
share and the clean accuracy drop come from `pipelines.request.poison_outcome`.
"""

from __future__ import annotations

import math

import unlearning
from benchmarks.common import Scale, load, log, original_model
from benchmarks.suites.blocks import Bench, answered, mean, method_row, run_request
from pipelines.request import poison_outcome

POISON_METHODS = ["potion", "ssd", "retrain", "finetune", "salun", "scrub", "l1_sparse", "neggrad_plus"]


def poison_suite(args, scale: Scale) -> dict:
    requests = [
        poison_request(args, scale, seed, identified)
        for seed in scale.seeds or [0]
        for identified in args.identified
    ]
    summary = [
        poison_summary(requests, identified, name)
        for identified in args.identified
        for name in args.methods
    ]
    return {"requests": requests, "summary": summary}


def poison_request(args, scale: Scale, seed: int, identified: float) -> dict:
    """One poisoned data set and its original model; the identified rows are the forget set."""
    modifier = f"+poison:rate={args.poison_rate},identified={identified},seed={seed},target=0"
    dataset, spec = load(scale, modifier)
    model, info = original_model(scale, dataset, seed, log)
    bench = Bench.build(model, dataset, scale, args.methods, scale.importance_batch)
    forget = unlearning.parse_forget("poison:identified", dataset)
    original, rows = run_request(bench, forget, f"seed {seed} identified {identified}")
    for row in rows:
        row["metrics"].update(poison_outcome(original, row["metrics"]))
    return {
        "seed": seed, "identified": identified, "data": spec, "original_model": info,
        "poisoned": dataset.notes["poison"]["poisoned"], "identified_count": len(forget.ids),
        "original": original, "rows": rows,
    }


def poison_summary(requests: list[dict], identified: float, name: str) -> dict:
    """One method at one identified share: mean and worst over the seeds."""
    kept, refused = answered([q for q in requests if q["identified"] == identified], name)
    rows = [method_row(q, name) for q in kept]
    if not rows:
        return {"identified": identified, "method": name, "refused": refused, "seeds": 0,
                **dict.fromkeys(("healed", "healed_min", "accuracy_drop", "accuracy_drop_max", "seconds"), math.nan)}
    return {
        "identified": identified,
        "method": name,
        "refused": refused,
        "healed": mean(r["metrics"]["healed"] for r in rows),
        "healed_min": min(r["metrics"]["healed"] for r in rows),
        "accuracy_drop": mean(r["metrics"]["accuracy_drop"] for r in rows),
        "accuracy_drop_max": max(r["metrics"]["accuracy_drop"] for r in rows),
        "seconds": mean(r["seconds_importance"] + r["seconds_unlearn"] for r in rows),
        "seeds": len(rows),
    }
