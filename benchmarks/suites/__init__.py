"""The suites, one module each; `blocks` holds what they share.

- `classes`: fullclass, subclass and random forgetting;
- `poison`: healing a backdoor from its identified rows;
- `speed`: importance throughput, unlearning vs retraining, the PTN search sequential vs on Tune.
"""

from benchmarks.suites.blocks import KIND
from benchmarks.suites.classes import COARSE, class_like_suite, random_suite
from benchmarks.suites.poison import POISON_METHODS, poison_suite
from benchmarks.suites.speed import speed_suite

SUITES = ("fullclass", "subclass", "random", "poison", "speed")
MODERN = ["salun", "scrub", "l1_sparse", "neggrad_plus"]  # today's baselines (docs/methods.md)
CLASS_METHODS = ["ssd", "lfssd", "assd", "potion_step", "ptn", "jit", "retrain", "finetune", "amnesiac", "bad_teacher",
                 *MODERN]


def run(suite: str, args, scale) -> dict:
    """One suite's result (its tables and plot are drawn from it)."""
    if suite in ("fullclass", "subclass"):
        return class_like_suite(args, scale, "class" if suite == "fullclass" else "subclass")
    if suite == "random":
        return random_suite(args, scale)
    if suite == "poison":
        return poison_suite(args, scale)
    return speed_suite(args, scale)


__all__ = [
    "CLASS_METHODS",
    "COARSE",
    "KIND",
    "POISON_METHODS",
    "SUITES",
    "class_like_suite",
    "poison_suite",
    "random_suite",
    "run",
    "speed_suite",
]
