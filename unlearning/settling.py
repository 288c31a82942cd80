"""Settling a PTN step before its pass over D_f ends (docs/implementation-notes.md, "Settling a
missed step early").

A walk only asks whether a step's forget accuracy is <= its target. Once more rows are right than
the loosest target of the request allows, the step misses every target, whatever the rest of
D_f gives: its pass stops there (`unlearning.passes.rows_right`) and its accuracy is recorded as
an `AtLeast`, a lower bound. Every decision of the walk, its refinement and a rho target's slack
is the one the full pass would give.
"""

from __future__ import annotations

import math


class AtLeast(float):
    """A forget accuracy known from below: its pass stopped past every target (module docstring)."""


def rows_allowed(ceiling: float, rows: int) -> int:
    """The most rows right out of `rows` whose accuracy (right / rows) is still <= `ceiling`:
    a pass with more right is past the ceiling, whatever the rest of its rows give."""
    allowed = min(rows, max(-1, math.floor(ceiling * rows)))
    while allowed < rows and (allowed + 1) / rows <= ceiling:  # floor() of a rounded product may be one off
        allowed += 1
    while allowed >= 0 and allowed / rows > ceiling:
        allowed -= 1
    return allowed


def search_ceiling(targets: list[float], settle_early: bool) -> float | None:
    """The accuracy past which a step's pass may stop: the loosest target a request's walks may
    take (a rho target's slack re-walks with looser ones), or None for full passes."""
    return max(targets) if settle_early else None
