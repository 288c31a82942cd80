"""A checkpoint as an MLflow model: what a registered version is to MLflow's own tools.

`mlflow.pytorch.load_model`, `mlflow.pyfunc.load_model` and `mlflow models serve` read the
version's logged model, written here in the pytorch flavor as a `torch.export` program
(`serialization_format="pt2"`): the model's graph of ATen operations and its weights, which
loads without the project installed and without unpickling Python objects (MLflow checks the
archive is pickle-free before loading it). The safetensors checkpoint stays next to it as the
run's `checkpoint/` artifact; the project itself only ever reads that.

The served model takes what the checkpoint's model takes: float32 inputs of shape
(N, *input_shape), already normalised, x' = (x - mean) / std per channel with the constants
recorded under `amnesis.normalize` in the MLmodel metadata (none for feature vectors); it
returns logits of shape (N, num_classes). The input example is a few real test rows, so
normalised.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

import unlearning
from unlearning.checkpoint import model_meta
from unlearning.data import Split
from unlearning.errors import UserError
from unlearning.models import logits_of

MODEL_NAME = "model"  # the logged model's name within its run
EXAMPLE_ROWS = 5  # more than one, so that torch.export keeps the batch dimension dynamic


def example_rows(split: Split, normalize: dict | None, rows: int = EXAMPLE_ROWS) -> np.ndarray:
    """The first rows of `split` as the model takes them: float32, normalised."""
    first = split.subset(torch.arange(min(rows, len(split))))
    inputs = torch.cat([x for x, _ in first.batches(rows, normalize=normalize)])
    if len(inputs) < 2:  # a batch of one would be exported as a fixed size
        inputs = torch.cat([inputs, inputs])
    return inputs.numpy().astype(np.float32)


def model_signature(meta: dict):
    """Tensor in, tensor out: (N, *input_shape) float32 -> (N, num_classes) float32 logits."""
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    float32 = np.dtype(np.float32)
    return ModelSignature(
        inputs=Schema([TensorSpec(float32, (-1, *meta["input_shape"]))]),
        outputs=Schema([TensorSpec(float32, (-1, meta["num_classes"]))]),
    )


class LogitsOnly(torch.nn.Module):
    """The checkpoint's model returning its logits tensor, also when it returns a dict or a
    ModelOutput (MLflow's pytorch flavor serves one tensor)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return logits_of(self.model(inputs))


def log_checkpoint_model(checkpoint: Path, input_example: np.ndarray):
    """Log the checkpoint at `checkpoint` as the active run's model; returns MLflow's ModelInfo."""
    import mlflow.pytorch

    model = unlearning.load_model(checkpoint).eval()
    meta = model_meta(model)
    metadata = {
        "amnesis": {
            "fingerprint": unlearning.model_fingerprint(model),
            "arch": meta["arch"],
            "input_shape": meta["input_shape"],
            "num_classes": meta["num_classes"],
            "normalize": meta.get("normalize"),
            "inputs": "normalised: (x - normalize.mean) / normalize.std per channel",
        }
    }
    try:
        return mlflow.pytorch.log_model(
            LogitsOnly(model).eval(),
            name=MODEL_NAME,
            signature=model_signature(meta),
            input_example=input_example,
            serialization_format="pt2",
            metadata=metadata,
            # the exported graph needs torch only; inferring requirements would load it in a subprocess
            pip_requirements=mlflow.pytorch.get_default_pip_requirements(),
        )
    except torch._dynamo.exc.TorchDynamoException as error:  # what torch.export cannot trace
        first = str(error).strip().splitlines()[0]
        raise UserError(f"torch.export cannot export {meta['arch']} for MLflow ({first}); "
                        "run the request with --no-track (track=False)") from None
