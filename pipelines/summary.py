"""What a person reads at the end of a run: a short table of the numbers that matter."""

from __future__ import annotations

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


def print_report(report: dict, out: str) -> None:
    params = ", ".join(f"{k}={_short(v)}" for k, v in report["params"].items() if v is not None)
    print(f"{report['method']} ({params}) forgot {report['forget']['size']} samples [{report['forget']['spec']}]")
    rows = [
        ("original", report["original_metrics"], None),
        (f"unlearned ({report['method']})", report["metrics"], report["seconds"]["total"]),
    ]
    if report.get("retrain_metrics"):
        rows.append(("retrained from scratch", report["retrain_metrics"], report.get("retrain_seconds")))
    print(format_table(rows))
    for run in report.get("importance", {}).get("on_ray", []):
        print(f"importance ({run['kind']}/{run['mode']}) of {run['rows']} rows ran on Ray: "
              f"{run['workers']} workers, {run['seconds']:.1f} s")
    details = report.get("details", {})
    if details.get("reached") is False:
        print("warning: the search did not reach its target; the most aggressive step was used")
    if report.get("mlflow"):
        entry = report["mlflow"]
        print(f"MLflow: run {entry['run_id']}, model {entry['model_name']} version {entry['model_version']} (@current)")
    print(f"-> {out}" + (" (report.md with plots inside)" if report.get("has_plots") else ""))


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
