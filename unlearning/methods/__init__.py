"""Unlearning methods, found by name.

- `registry`: `register_method`, `get_method`, `run_method`, `MethodOutput`, `METHODS`.
- `task`: `UnlearningTask`, what a method gets for one deletion request.
- one module per family: `ssd_family` (SSD, LFSSD, ASSD, Potion, PTN), `jit`, `baselines`,
  `modern` (SalUn, SCRUB, l1-sparse, NegGrad+).

The input model is never modified. Adding a method: docs/adding-a-method.md.
"""

# Registration happens on import of each method module.
from unlearning.methods import baselines, hyperforget, jit, modern, ssd_family  # noqa: E402,F401,I001
from unlearning.methods.registry import (
    METHODS,
    Method,
    MethodOutput,
    canonical_name,
    check_params,
    get_method,
    register_method,
    run_method,
)
from unlearning.methods.task import UnlearningTask

__all__ = ["METHODS", "Method", "MethodOutput", "UnlearningTask", "canonical_name", "check_params", "get_method", "register_method", "run_method"]
