"""The markdown tables of a suite's result (RESULTS.md quotes them); `table(suite, result)`."""

from __future__ import annotations

import math
import re

CLASS_HEADER = (
    "| method | retain acc | forget acc | forget acc (train rows) | test acc | MIA | retain drop (pts) "
    "| worst forget acc (request) | worst retain drop | importance s | unlearn s |"
)
RANDOM_HEADER = "| method | retain acc (train) | forget acc | test acc | MIA | importance s | unlearn s |"
POISON_HEADER = (
    "| seed | identified | method | ASR before → after | healed % | clean acc before → after "
    "| drop (pts) | seconds |"
)
POISON_SUMMARY_HEADER = "| identified | method | healed % mean (min) | drop pts mean (max) | seconds | seeds |"


def table(suite: str, result: dict) -> str:
    if suite in ("fullclass", "subclass"):
        return class_table(result["summary"])
    if suite == "random":
        return random_table(result["summary"])
    if suite == "poison":
        return poison_table(result)
    return speed_table(result)


def number(x, scale: float = 1.0, digits: int = 1) -> str:
    """`scale * x` to `digits` places; "–" for a figure nobody measured (None, or NaN: a refusal)."""
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{scale * x:.{digits}f}"


def pct(x) -> str:
    return number(x, 100)


def method(summary: dict) -> str:
    """The method's name, and how many of its requests it refused (averages leave them out)."""
    refused = summary.get("refused", 0)
    return f"{summary['method']} ({refused} refused)" if refused else summary["method"]


def refusal(row: dict) -> str:
    """'refused (N pts)': a request the method refused, with the retained cost it named."""
    cost = re.search(r"costs (\d+\.\d) points", row["details"].get("refused", ""))
    return f"refused ({cost.group(1)} pts of retained acc)" if cost else "refused"


def class_table(summary) -> str:
    lines = [CLASS_HEADER, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for s in summary:
        lines.append(
            f"| {method(s)} | {pct(s['retain_acc'])} | {pct(s['forget_acc'])} | {pct(s['train_forget_acc'])} | "
            f"{pct(s['test_acc'])} | {pct(s['mia'])} | {pct(s['retain_drop'])} | "
            f"{pct(s['worst_forget_acc'])} ({s['worst_forget_class']}) | {pct(s['worst_retain_drop'])} | "
            f"{number(s['seconds_importance'])} | {number(s['seconds_unlearn'])} |"
        )
    return "\n".join(lines)


def random_table(summary) -> str:
    rmia = "rmia_auc" in summary[0]
    header = RANDOM_HEADER.replace("| MIA |", "| MIA | RMIA AUC | RMIA flagged at 5 % FPR |") if rmia else RANDOM_HEADER
    lines = [header, "|---|---:|---:|---:|---:|" + ("---:|---:|" if rmia else "") + "---:|---:|"]
    for s in summary:
        extra = f"{s['rmia_auc']:.3f} | {pct(s['rmia_flagged'])} | " if rmia else ""
        lines.append(f"| {method(s)} | {pct(s['retain_acc'])} | {pct(s['forget_acc'])} | {pct(s['test_acc'])} | "
                     f"{pct(s['mia'])} | {extra}{number(s['seconds_importance'])} | {number(s['seconds_unlearn'])} |")
    return "\n".join(lines)


def poison_table(result) -> str:
    """Per request (seed, identified share, method), then the summary over seeds."""
    lines = [POISON_HEADER, "|---:|---:|---|---:|---:|---:|---:|---:|"]
    for q in result["requests"]:
        lines.extend(poison_request_line(q, r) for r in q["rows"])
    lines += ["", POISON_SUMMARY_HEADER, "|---:|---|---:|---:|---:|---:|"]
    for s in result["summary"]:
        lines.append(f"| {s['identified']:.0%} | {method(s)} | {pct(s['healed'])} ({pct(s['healed_min'])}) | "
                     f"{number(s['accuracy_drop'], 100, 2)} ({number(s['accuracy_drop_max'], 100, 2)}) | {number(s['seconds'])} | "
                     f"{s['seeds']} |")
    return "\n".join(lines)


def poison_request_line(q, r) -> str:
    o, m = q["original"], r["metrics"]
    if r.get("refused"):
        return (f"| {q['seed']} | {q['identified_count']}/{q['poisoned']} | {r['method']} | {refusal(r)} | – | "
                f"{pct(o['test_acc'])} → – | – | – |")
    return (
        f"| {q['seed']} | {q['identified_count']}/{q['poisoned']} | {r['method']} | "
        f"{pct(o['attack_success_rate'])} → {pct(m['attack_success_rate'])} | {pct(m['healed'])} | "
        f"{pct(o['test_acc'])} → {pct(m['test_acc'])} | {100 * m['accuracy_drop']:.2f} | "
        f"{r['seconds_importance'] + r['seconds_unlearn']:.1f} |"
    )


def speed_table(result) -> str:
    lines = ["| figure | value |", "|---|---:|"]
    for row in result["importance_throughput"]:
        lines.append(f"| importance, {row['variant']}: end-to-end rows/s (streaming rows/s) | "
                     f"{row['rows_per_s']:.0f} ({row.get('streaming_rows_per_s') or float('nan'):.0f}) |")
    u = result.get("unlearn_vs_retrain")
    if u:
        lines.extend(retrain_lines(u))
    p = result.get("ptn_parallel")
    if p:
        lines.extend(ptn_lines(p))
    return "\n".join(lines)


def retrain_lines(u) -> list[str]:
    ssd_and_importance = u["ssd_unlearn_seconds"] + u["ssd_forget_importance_seconds"]
    return [
        f"| SSD unlearning step, s ({u['forget']}) | {u['ssd_unlearn_seconds']:.2f} |",
        f"| SSD forget-set importance, s | {u['ssd_forget_importance_seconds']:.1f} |",
        f"| importance over D (once per model), s | {u['importance_over_D_seconds']:.1f} |",
        f"| retrain ({u['retrain_epochs']} epochs), s | {u['retrain_seconds']:.1f} |",
        f"| **retrain / SSD step** | **{u['retrain_seconds'] / u['ssd_unlearn_seconds']:.0f}×** |",
        f"| **retrain / (SSD step + forget importance)** | **{u['retrain_seconds'] / ssd_and_importance:.1f}×** |",
    ]


def ptn_lines(p) -> list[str]:
    lines = [
        f"| PTN request, target | {p.get('forget', '')}, forget acc ≤ {p.get('target', float('nan')):.3f} |",
        f"| PTN sequential loop: steps to the answer, s per step, total s | "
        f"{p['steps_to_answer']}, {p['step_seconds']:.2f}, {p['sequential_seconds']:.1f} |",
    ]
    for k in [k for k in (1, 2) if f"ray_{k}_seconds" in p]:
        lines.append(f"| PTN on Ray, {k} trial(s): s (steps evaluated; same answer) | "
                     f"{p[f'ray_{k}_seconds']:.1f} ({p[f'ray_{k}_steps_evaluated']}; {p[f'ray_{k}_same_answer']}) |")
    lines.append(f"| **sequential / Ray with 2 trials** | **{p['sequential_seconds'] / p['ray_2_seconds']:.2f}×** |")
    if "ray_1_seconds" in p:
        lines.append(f"| **Ray 1 trial / Ray 2 trials** | **{p['ray_1_seconds'] / p['ray_2_seconds']:.2f}×** |")
    return lines
