"""What a person reads at the end of a run: a short table of the numbers that matter."""

from __future__ import annotations

from pipelines.report import RequestReport

COLUMNS = [
    ("retain_acc", "retain acc"),
    ("forget_acc", "forget acc"),
    ("test_acc", "test acc"),
    ("test_forget_acc", "test forget-class acc"),
    ("mia", "MIA"),
    ("zrf", "ZRF"),
    ("attack_success_rate", "attack success"),
    ("healed", "healed"),
]


def format_table(rows: list[tuple[str, dict, float | None]]) -> str:
    """rows: (name, metrics, seconds). Columns appear only if some row has them."""
    columns = [(key, title) for key, title in COLUMNS if any(key in m for _, m, _ in rows)]
    header = ["model"] + [title for _, title in columns] + ["seconds"]
    body = []
    for name, metrics, seconds in rows:
        cells = [name]
        for key, _ in columns:
            value = metrics.get(key)
            cells.append("-" if value is None else f"{100 * value:.1f}%")
        cells.append("-" if seconds is None else f"{seconds:.1f}")
        body.append(cells)
    widths = [max(len(str(r[i])) for r in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in [header, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def print_report(report: RequestReport, out: str) -> None:
    params = ", ".join(f"{k}={_short(v)}" for k, v in report.params.items() if v is not None)
    print(f"{report.method} ({params}) forgot {report.forget.size} samples [{report.forget.spec}]")
    print(format_table(report_rows(report, f"unlearned ({report.method})", "retrained from scratch")))
    for run in report.importance.on_ray:
        print(f"importance ({run['kind']}/{run['mode']}) of {run['rows']} rows ran on Ray: "
              f"{run['workers']} workers, {run['seconds']:.1f} s")
    if report.method_on_ray:
        run = report.method_on_ray
        print(f"{run['method']} ran as a Ray task on {run['device']} ({run['threads']} threads), {run['seconds']:.1f} s")
    if report.passes_on_ray:
        rows = sum(run["rows"] for run in report.passes_on_ray)
        seconds = sum(run["seconds"] for run in report.passes_on_ray)
        print(f"evaluation: {len(report.passes_on_ray)} passes over {rows} rows ran on Ray, {seconds:.1f} s")
    if not report.reached:
        print("warning: the search did not reach its target; the most aggressive step was used")
    if report.target is not None:
        print(target_line(report))
    if report.forget.kind == "poison" and "attack_success_rate" not in report.metrics:
        print(poison_line(report))
    if report.mlflow is not None:
        entry = report.mlflow
        if entry.adopted:
            print(f"adopted {out}, written by an interrupted run of this request: recorded, not recomputed")
        current = " (@current)" if entry.current_version == entry.model_version else ""
        print(f"MLflow: run {entry.run_id}, model {entry.model_name} version {entry.model_version}{current}")
    print(f"-> {out}" + (" (report.md with plots inside)" if report.has_plots else ""))


def poison_line(report: RequestReport) -> str:
    """What a poison request from an id list can show: the trigger is unknown, so no attack rate."""
    before, after = report.original_metrics["forget_acc"], report.metrics["forget_acc"]
    drop = 100 * (report.original_metrics["test_acc"] - report.metrics["test_acc"])
    return (f"poison declared by id list: the flagged rows' accuracy on their own labels went "
            f"{100 * before:.1f} % -> {100 * after:.1f} %, test accuracy drop {drop:.1f} points; "
            "the attack's success rate needs the trigger and is not measured")


def target_line(report: RequestReport) -> str:
    """The forget-accuracy target, met or plainly NOT met, and where `@current` is."""
    accuracy, target = 100 * report.metrics["forget_acc"], 100 * report.target
    if report.target_met:
        return f"target met: forget accuracy {accuracy:.1f} % <= target {target:.1f} %{slack_note(report)}"
    line = f"target NOT met: forget accuracy {accuracy:.1f} % > target {target:.1f} %"
    entry = report.mlflow
    if entry is None:
        return line + "; not registered"
    if entry.current_version == entry.model_version:
        return line + f"; registered as version {entry.model_version}, @current moved to it (--accept-unmet)"
    stays = f"stays at version {entry.current_version}" if entry.current_version else "does not point to it"
    return line + f"; registered as version {entry.model_version} but @current {stays} (--accept-unmet moves it)"


def slack_note(report: RequestReport) -> str:
    """How far a rho target rose, and why (docs/methods.md#a-ρ-targets-slack); '' if it did not."""
    tried = (report.details.get("slack") or {}).get("tried") or []
    before = report.details.get("retain_sample_acc_before")
    if not tried or tried[0]["target"] == report.target or before is None:
        return ""
    used = next(run for run in tried if run["target"] == report.target)
    return (f" (raised from rho x A_0 = {100 * tried[0]['target']:.1f} %, whose answer cost "
            f"{100 * (before - tried[0]['retain_acc']):.1f} points of retained accuracy; this one "
            f"{100 * (before - used['retain_acc']):.1f})")


def report_rows(report: RequestReport, unlearned: str, retrained: str) -> list[tuple[str, dict, float | None]]:
    """The table's rows: original, unlearned, and retrained when it was compared."""
    rows = [("original", report.original_metrics, None), (unlearned, report.metrics, report.seconds["total"])]
    if report.retrain_metrics:
        rows.append((retrained, report.retrain_metrics, report.retrain_seconds))
    return rows


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
