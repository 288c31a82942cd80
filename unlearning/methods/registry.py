"""The method registry: a name -> function table, filled by `@register_method`.

A method is a function `fn(task: UnlearningTask, **params) -> MethodOutput`, registered with
`@register_method("name", **defaults)`; its docstring's first line is its summary. Adding one
is one file in this package plus its registration (docs/adding-a-method.md).
"""

from __future__ import annotations

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


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise UserError(f"unknown method {name!r}; known: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def run_method(name: str, task: UnlearningTask, **params) -> MethodOutput:
    method = get_method(name)
    unknown = sorted(set(params) - set(method.defaults))
    if unknown:
        raise UserError(f"method {name!r} has no parameter {unknown[0]!r}; it takes {sorted(method.defaults)}")
    merged = {**method.defaults, **{k: v for k, v in params.items() if v is not None}}
    with torch.random.fork_rng():
        torch.manual_seed(task.seed)
        return method.fn(task, **merged)
