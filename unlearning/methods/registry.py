"""The method registry: a name -> function table, filled by `@register_method`.

A method is a function `fn(task: UnlearningTask, **params) -> MethodOutput`, registered with
`@register_method("name", **defaults)`; its docstring's first line is its summary. Adding one
is one file in this package plus its registration (docs/adding-a-method.md).
"""

from __future__ import annotations

import math
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from unlearning.errors import UserError

if TYPE_CHECKING:
    from unlearning.methods.task import UnlearningTask


@dataclass
class MethodOutput:
    model: nn.Module
    params: dict  # the parameters actually used (e.g. the alpha a search chose)
    details: dict = field(default_factory=dict)  # e.g. the search path


@dataclass
class Method:
    name: str
    fn: Callable[..., MethodOutput]
    defaults: dict
    summary: str
    own_loop: bool = False  # reads rows in its own loop (training), not through the task's executor


METHODS: dict[str, Method] = {}


def register_method(name: str, *, own_loop: bool = False, **defaults):
    """Register `fn` as method `name` with parameter `defaults`. `own_loop`: the method reads
    rows in its own training loop rather than through the task's passes (importance, outcomes),
    so a pipeline that keeps rows out of its driver runs the whole method where the data is."""

    def decorator(fn):
        summary = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
        METHODS[name] = Method(name, fn, defaults, summary, own_loop)
        return fn

    return decorator


# Earlier names that still work: `potion_ptn` was the paper's Potion before `potion` meant it.
ALIASES = {"potion_ptn": "potion"}


def canonical_name(name: str) -> str:
    """The registered name `name` stands for (itself, or what an earlier name became)."""
    return ALIASES.get(name, name)


def get_method(name: str) -> Method:
    name = canonical_name(name)
    if name not in METHODS:
        raise UserError(f"unknown method {name!r}; known: {', '.join(sorted(METHODS))}")
    return METHODS[name]


# Every number a method takes must be finite and > 0 (counts: integers >= 1), except these,
# which must lie in (low, high], or in [low, high] where marked closed.
LIMITS = {"target": (0.0, 1.0, "closed"), "rho": (0.0, 1.0, ""), "retain_share": (0.0, 1.0, ""),
          "growth": (1.0, math.inf, ""), "mask_share": (0.0, 1.0, ""), "beta": (0.0, 1.0, ""),
          "max_retain_drop": (0.0, 1.0, "closed"), "relax_after_drop": (0.0, 1.0, "closed")}
CHOICES = {"kind": ("fisher", "l2", "l2_norm"), "reference": ("full", "retain"), "setting": ("small", "large")}


def check_params(name: str, params: dict) -> None:
    """UserError naming the first parameter `name` does not take or a value it cannot use,
    checked against the method's annotations before any work starts (None = the default)."""
    method = get_method(name)
    unknown = sorted(set(params) - set(method.defaults))
    if unknown:
        raise UserError(f"method {name!r} has no parameter {unknown[0]!r}; it takes {sorted(method.defaults)}")
    try:
        hints = typing.get_type_hints(method.fn)
    except Exception:  # an annotation that does not resolve: judge by the defaults' types
        hints = {k: type(v) for k, v in method.defaults.items() if v is not None}
    for key, value in params.items():
        if value is not None:
            _check_value(name, key, value, _base_type(hints.get(key)))


def _base_type(hint) -> type | None:
    """`float | None` -> float; `int` -> int."""
    args = [a for a in typing.get_args(hint) if a is not type(None)] if typing.get_args(hint) else [hint]
    return args[0] if len(args) == 1 and isinstance(args[0], type) else None


def _check_value(method: str, key: str, value, kind: type | None) -> None:
    where = f"method {method!r} parameter {'lambda' if key == 'lam' else key}"
    if kind is str:
        if not isinstance(value, str) or (key in CHOICES and value not in CHOICES[key]):
            allowed = f"one of {', '.join(CHOICES[key])}" if key in CHOICES else "a string"
            raise UserError(f"{where} must be {allowed}, got {value!r}")
        return
    if kind is bool:
        if not isinstance(value, bool):
            raise UserError(f"{where} must be true or false, got {value!r}")
        return
    if kind not in (int, float):
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        raise UserError(f"{where} must be {'an integer' if kind is int else 'a number'}, got {value!r}")
    low, high, closed = LIMITS.get(key, (0.0, math.inf, ""))
    inside = (low <= value if closed else low < value) and value <= high and math.isfinite(value)
    if kind is int and value < 1:
        inside = False
    if not inside:
        bounds = f"in {'[' if closed else '('}{low:g}, {high:g}]" if high < math.inf else f"> {low:g}"
        raise UserError(f"{where} must be a finite {'integer' if kind is int else 'number'} {bounds}, got {value!r}")


def run_method(name: str, task: UnlearningTask, **params) -> MethodOutput:
    method = get_method(name)
    check_params(name, params)
    merged = {**method.defaults, **{k: v for k, v in params.items() if v is not None}}
    with torch.random.fork_rng():
        torch.manual_seed(task.seed)
        return method.fn(task, **merged)
