"""`unlearning` is the core: it imports and works with none of the pipelines' packages."""

from __future__ import annotations

import subprocess
import sys
import textwrap

BLOCKED = ("ray", "mlflow", "optuna", "sqlalchemy", "yaml", "tqdm", "matplotlib", "pipelines")

SCRIPT = textwrap.dedent(
    """
    import importlib.abc, sys

    BLOCKED = {blocked!r}

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{{name}} is blocked in this test")
            return None

    sys.meta_path.insert(0, Block())
    for name in list(sys.modules):
        if name.split(".")[0] in BLOCKED:
            del sys.modules[name]

    import torch
    import unlearning

    dataset = unlearning.load_dataset("digits")
    model = unlearning.new_model("small_cnn", 10, dataset.input_shape, dataset.normalization(), seed=0)
    forget = unlearning.parse_forget("class:3", dataset)
    norm = unlearning.model_meta(model)["normalize"]
    retain, forget_rows = unlearning.data.split_forget(dataset, forget)
    full = unlearning.compute_importance(model, dataset.train.batches(256, normalize=norm))
    forget_importance = unlearning.compute_importance(model, forget_rows.batches(256, normalize=norm))
    new_model = unlearning.ssd(model, full, forget_importance, alpha=1.0, lam=1.0)
    changed = sum(int((a != b).sum()) for a, b in zip(model.parameters(), new_model.parameters()))
    assert changed > 0, "SSD changed no weight"
    assert not any(name.split(".")[0] in BLOCKED for name in sys.modules), sorted(sys.modules)
    print("ok", changed)
    """
)


def test_unlearning_imports_and_runs_importance_and_ssd_with_ray_mlflow_and_the_ledger_blocked():
    script = SCRIPT.format(blocked=BLOCKED)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("ok ") and int(result.stdout.split()[1]) > 0
