"""Retained damage in a PTN answer: the ceiling on it, and the slack a rho target may take to
spare it (docs/methods.md#ptn-search; docs/implementation-notes.md, "A ceiling on retained damage"
and "A rho target's slack")."""

from __future__ import annotations

from collections.abc import Callable

from unlearning.errors import UserError
from unlearning.search import PTNConfig, SearchResult, Step

# search(target) -> (the walk's result, the step to apply or None, details): unlearning.search.ptn_search
Search = Callable[[float], tuple[SearchResult, Step | None, dict]]


def check_retained_cost(before: float, after: float, limit: float, rows: int, target: float) -> dict:
    """The answer's cost on the seeded retained sample, or a UserError above `limit` (a search
    meets its target at any price: docs/implementation-notes.md, "A ceiling on retained damage")."""
    if before - after > limit:
        raise UserError(
            f"reaching the forget target, {100 * target:.1f} %, costs {100 * (before - after):.1f} points of retained "
            f"accuracy ({100 * before:.1f} -> {100 * after:.1f} % on {rows} seeded retained rows), more than "
            f"max_retain_drop={limit:g}; nothing was written or registered (the forget set may hold rows any model "
            "gets right, e.g. real members of a poison's target class: a higher target or rho spares them; "
            "max_retain_drop=1 accepts the cost)"
        )
    return {"retain_sample_acc_before": before, "retain_sample_acc": after}


def search_with_slack(
    search: Search, targets: list[float], retain_accuracy: Callable[[Step], float], before: float, rows: int,
    config: PTNConfig,
) -> tuple[float, SearchResult, Step, dict]:
    """(the target used, the walk's result, the step to apply, details), the answer's cost
    checked against `config.max_retain_drop` (`check_retained_cost`); `retain_accuracy` scores a
    step on the `rows` seeded retained rows where the original scores `before`.

    `targets`: the request's target, then looser ones (unlearning.targets.slack_targets). The
    answer at the first, unless it costs more than `config.relax_after_drop` of the retained
    sample's accuracy (`before` on the original model) and the loosest target's answer keeps more
    than that more: then the least loose target whose answer keeps within `relax_after_drop` of
    the loosest's (a bisection: looser targets take gentler steps). Slack is spent only where it
    buys retained accuracy. Every search run is in details["slack"].
    """
    relax_after_drop = config.relax_after_drop
    runs: dict[int, tuple] = {}

    def run(i: int) -> tuple:
        if i not in runs:
            result, chosen, details = search(targets[i])
            chosen = chosen or result.path[-1][0]
            runs[i] = (result, chosen, details, retain_accuracy(chosen))
        return runs[i]

    def enough(i: int, best: float) -> bool:  # meets its target and keeps within the allowance of `best`
        return run(i)[0].reached and best - run(i)[3] <= relax_after_drop

    pick, last = 0, len(targets) - 1
    if not enough(0, before) and last > 0 and run(last)[0].reached and not enough(0, run(last)[3]):
        low, pick = 0, last  # the answer at `low` keeps too little, at `pick` enough
        while pick - low > 1:
            middle = (low + pick) // 2
            low, pick = (low, middle) if enough(middle, run(last)[3]) else (middle, pick)
    result, chosen, details, after = runs[pick]
    cost = check_retained_cost(before, after, config.max_retain_drop, rows, targets[pick])
    tried = [{"target": targets[i], "retain_acc": runs[i][3], "reached": runs[i][0].reached} for i in sorted(runs)]
    return targets[pick], result, chosen, {**details, "slack": {"targets": len(targets), "tried": tried}, **cost}
