"""The human-readable report of one request: report.md plus three PNGs.

- per_class.png: test accuracy per class, original vs unlearned (vs retrained when compared);
- search_path.png: forget and retained accuracy at each step of the search walk;
- importance_ratios.png: the distribution of I^f / I^D with the chosen threshold alpha.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from pipelines.report import RequestReport
from pipelines.summary import format_table, report_rows, slack_note
from unlearning.dampening import importance_ratios
from unlearning.methods import UnlearningTask
from unlearning.search import Step, dampened_copy

MAX_PATH_POINTS = 40  # steps re-evaluated for the retained-accuracy curve
RETAIN_SAMPLE = 1000  # retained rows per re-evaluated step


def _figure(width: float, height: float):
    """A figure and its axes, drawn without pyplot: no backend is chosen or changed here (the
    CLI chooses one), so a notebook calling the library keeps its own."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=120)
    return fig, fig.subplots()


def plot_per_class(report: RequestReport, class_names: list[str], path: Path) -> None:
    series = [(name, metrics) for name, metrics, _ in report_rows(report, f"unlearned ({report.method})", "retrained")]
    n = len(class_names)
    width = 0.8 / len(series)
    fig, ax = _figure(max(6.0, 0.6 * n + 2), 4.0)
    for i, (label, metrics) in enumerate(series):
        values = [100 * (v if v == v else 0.0) for v in metrics["per_class_test_acc"]]
        ax.bar(np.arange(n) + (i - (len(series) - 1) / 2) * width, values, width, label=label)
    for k in report.forget.classes if report.forget.kind == "class" else []:
        ax.axvspan(k - 0.45, k + 0.45, color="red", alpha=0.08)
    ax.set_xticks(np.arange(n), class_names, rotation=45 if n > 10 else 0, ha="right" if n > 10 else "center")
    ax.set_xlabel("class (forgotten class shaded)" if report.forget.kind == "class" else "class")
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 105)
    ax.set_title(f"Per-class test accuracy: forget {report.forget.spec}")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=len(series), fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path)


def search_curve(task: UnlearningTask, report: RequestReport) -> list[dict]:
    """Forget accuracy (from the search) and retained accuracy (on a sample) along the path."""
    path = report.details.get("path") or []
    if not path:
        return []
    kind, reference = report.params.get("kind", "fisher"), report.params.get("reference", "full")
    full, forget = task.importance(reference, kind), task.importance("forget", kind)
    chosen = (report.params.get("step"), report.params.get("lambda"))
    picks = sorted(set(np.linspace(0, len(path) - 1, min(len(path), MAX_PATH_POINTS)).round().astype(int).tolist()))
    retain = task.retain_sample(RETAIN_SAMPLE, seed=0)
    curve = []
    for i in picks:
        entry = path[i]
        step = Step(entry["index"], entry["alpha"], entry["lam"])
        model = dampened_copy(task.model, full, forget, step)
        curve.append({**entry, "retain_acc": task.accuracy(model, retain), "chosen": (entry["index"], entry["lam"]) == chosen})
    return curve


def plot_search_path(curve: list[dict], target: float | None, path: Path) -> None:
    fig, ax = _figure(6.4, 3.6)
    steps = [c["index"] for c in curve]
    ax.plot(steps, [100 * c["forget_acc"] for c in curve], marker="o", ms=3, label="forget-set accuracy")
    stopped = [c for c in curve if c.get("stopped_early")]
    if stopped:  # a pass that stopped once past every target: its accuracy is at least this
        ax.plot([c["index"] for c in stopped], [100 * c["forget_acc"] for c in stopped], ls="none", marker="^",
                ms=5, mfc="white", color="tab:blue", label="at least (pass stopped past the target)")
    ax.plot(steps, [100 * c["retain_acc"] for c in curve], marker="s", ms=3, label=f"retained accuracy (sample of {RETAIN_SAMPLE})")
    if target is not None:
        ax.axhline(100 * target, color="grey", ls="--", lw=1, label=f"target ({100 * target:.1f}%)")
    for c in curve:
        if c["chosen"]:
            ax.axvline(c["index"], color="green", lw=1, label=f"chosen step {c['index']} (α={c['alpha']:.3g}, λ={c['lam']:.3g})")
    ax.set_xlabel("search step (least → most aggressive dampening)")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(-3, 103)
    ax.set_title("Search path")
    ax.legend(loc="center right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path)


def plot_ratios(task: UnlearningTask, report: RequestReport, path: Path) -> None:
    kind, reference = report.params.get("kind", "fisher"), report.params.get("reference", "full")
    ratios = importance_ratios(task.importance(reference, kind), task.importance("forget", kind))
    ratios = ratios[ratios > 0]
    fig, ax = _figure(6.4, 3.6)
    ax.hist(np.log10(ratios.numpy()), bins=100, color="tab:blue", alpha=0.8)
    ax.set_yscale("log")
    alpha = report.params.get("alpha")
    if alpha:
        selected = float((ratios > alpha).double().mean())
        ax.axvline(math.log10(alpha), color="red", lw=1.5, label=f"α = {alpha:.3g}: {100 * selected:.2f}% of parameters dampened")
        ax.legend(fontsize=8)
    ax.set_xlabel("log10 importance ratio  I_forget / I_full")
    ax.set_ylabel("parameters (log scale)")
    ax.set_title(f"Importance ratios ({kind})")
    fig.tight_layout()
    fig.savefig(path)


def write_report_files(task: UnlearningTask, report: RequestReport, class_names: list[str], directory: Path) -> list[Path]:
    """report.md and its PNGs into `directory`; returns the files written."""
    directory = Path(directory)
    files = [directory / "per_class.png"]
    plot_per_class(report, class_names, files[0])
    curve = search_curve(task, report)
    if curve:
        files.append(directory / "search_path.png")
        plot_search_path(curve, report.params.get("target"), files[-1])
    if "alpha" in report.params:
        files.append(directory / "importance_ratios.png")
        plot_ratios(task, report, files[-1])
    lines = page_lines(report) + [f"![{f.stem}]({f.name})" for f in files]
    (directory / "report.md").write_text("\n".join(lines) + "\n")
    return [directory / "report.md", *files]


def page_lines(report: RequestReport) -> list[str]:
    """report.md's text above the plots."""
    params = ", ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in report.params.items() if v is not None
    )
    forget, seconds = report.forget, report.seconds
    return [
        f"# Deletion request: forget `{forget.spec}`",
        "",
        f"- method: **{report.method}** ({params})",
        *([f"- target: forget accuracy <= {100 * report.target:.1f}%: "
           f"{'met' if report.target_met else '**NOT met**'} ({100 * report.metrics['forget_acc']:.1f}%)"
           f"{slack_note(report)}"]
          if report.target is not None else []),
        f"- forget set: {forget.size} samples ({100 * forget.forget_fraction:.2f}% of the training data), "
        f"manifest {forget.manifest_hash}",
        f"- data: `{report.data['spec']}` ({report.data['fingerprint']}); importance mode {report.importance.mode}",
        f"- seconds: importance {seconds['importance']:.1f}, unlearning {seconds['unlearn']:.1f}",
        "",
        "```",
        format_table(report_rows(report, report.method, "retrained")),
        "```",
        "",
        "Accuracies are per-sample fractions; MIA is the share of forget samples a logistic",
        'regression on softmax entropy calls "member" (lower is better; compare with retraining).',
        "",
    ]
