"""The PNG plot of a suite's result: `plot(suite, result, path, title)`."""

from __future__ import annotations

import math
from pathlib import Path


def plot(suite: str, result: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if suite in ("fullclass", "subclass", "random"):
        fig = summary_plot(plt, suite, result["summary"])
    elif suite == "poison":
        fig = poison_plot(plt, result["summary"])
    else:
        fig = speed_plot(plt, result)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary_plot(plt, suite: str, summary: list[dict]):
    """Bars per method (means over requests); the worst request, or retrain's MIA for random."""
    names = [s["method"] for s in summary]
    first = ("test_acc", "test acc") if suite == "random" else ("retain_acc", "retain acc")
    keys = [first, ("forget_acc", "forget acc"), ("mia", "MIA")]
    fig, ax = plt.subplots(figsize=(11, 4.5))
    width = 0.27
    for i, (key, label) in enumerate(keys):
        ax.bar([x + (i - 1) * width for x in range(len(names))], [100 * s[key] for s in summary], width, label=label)
    if suite != "random":
        ax.scatter(range(len(names)), [100 * s["worst_forget_acc"] for s in summary], marker="v", color="black",
                   zorder=3, label="worst request's forget acc")
    else:
        retrain = next((s for s in summary if s["method"] == "retrain"), None)
        if retrain:
            ax.axhline(100 * retrain["mia"], color="black", linestyle="--", label="retrain MIA (reference)")
    for i, s in enumerate(summary):
        if math.isnan(s[keys[0][0]]):
            ax.text(i, 3, "diverged\n(non-finite)", ha="center", fontsize=8)
    ax.set_xticks(range(len(names)), names, rotation=20)
    ax.set_ylabel("percent (mean over requests)")
    ax.set_ylim(0, 105)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    return fig


def poison_plot(plt, summary: list[dict]):
    """Healed share (left) and clean accuracy drop (right) against the identified share."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    for name in dict.fromkeys(s["method"] for s in summary):
        rows = [s for s in summary if s["method"] == name]
        xs = [100 * s["identified"] for s in rows]
        left.plot(xs, [100 * s["healed"] for s in rows], marker="o", label=name)
        right.plot(xs, [100 * s["accuracy_drop"] for s in rows], marker="o", label=name)
    left.axhline(90, color="grey", linestyle=":", label="goal 90 %")
    left.axhline(93.72, color="black", linestyle="--", label="paper: Potion+PTN 93.72 %")
    right.axhline(2, color="grey", linestyle=":", label="limit 2 pts")
    right.axhline(1.41, color="black", linestyle="--", label="paper: 1.41 pts")
    left.set_xlabel("identified share of the poison (%)")
    right.set_xlabel("identified share of the poison (%)")
    left.set_ylabel("attack healed (%), mean over seeds")
    right.set_ylabel("clean test accuracy drop (points)")
    left.legend(fontsize=8)
    right.legend(fontsize=8)
    return fig


def speed_ratios(result: dict) -> tuple[list[str], list[float]]:
    """(labels, ratios, higher = faster) of the throughput and PTN parts."""
    p = result.get("ptn_parallel")
    bare = next((r for r in result["importance_throughput"] if r["baseline"]), None)
    labels, values = [], []
    for row in result["importance_throughput"]:
        if row["variant"].startswith("ray"):
            labels.append(f"importance {row['variant']}\nstreaming / bare")
            values.append(row["streaming_rows_per_s"] / bare["rows_per_s"])
            labels.append(f"importance {row['variant']}\nend-to-end / bare")
            values.append(row["rows_per_s"] / bare["rows_per_s"])
    if p:
        labels.append("PTN: sequential /\nRay 2 trials")
        values.append(p["sequential_seconds"] / p["ray_2_seconds"])
        if "ray_1_seconds" in p:
            labels.append("PTN: Ray 1 trial /\nRay 2 trials")
            values.append(p["ray_1_seconds"] / p["ray_2_seconds"])
    return labels, values


def speed_plot(plt, result: dict):
    """Speed ratios (left) and SSD vs retrain wall seconds (right)."""
    labels, values = speed_ratios(result)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [3, 1]})
    if values:
        left.bar(range(len(values)), values, color="tab:blue")
        left.axhline(1, color="black", linewidth=0.8)
        left.set_xticks(range(len(values)), labels, fontsize=7)
        left.set_ylabel("speed ratio (higher = faster)")
        for i, v in enumerate(values):
            left.text(i, v, f"{v:.2f}", ha="center", va="bottom", fontsize=8)
    else:  # --speed-parts left out the throughput and PTN parts
        left.axis("off")
        left.text(0.5, 0.5, "throughput and PTN parts not run (--speed-parts)", ha="center", va="center")
    u = result.get("unlearn_vs_retrain")
    if u:
        right.bar(["SSD step", "SSD + forget\nimportance", f"retrain\n({u['retrain_epochs']} epoch(s))"],
                  [u["ssd_unlearn_seconds"], u["ssd_unlearn_seconds"] + u["ssd_forget_importance_seconds"],
                   u["retrain_seconds"]], color=["tab:green", "tab:olive", "tab:red"])
        right.set_yscale("log")
        right.set_ylabel("wall seconds (log)")
    else:
        right.axis("off")
    return fig
