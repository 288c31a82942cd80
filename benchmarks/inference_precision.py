"""One outcome pass (`unlearning.passes.predict_outcomes`, what a search step runs over D_f) in
float32 and under bfloat16 autocast (a request's `--inference-precision`).

Times eval-mode passes of a fresh network (--arch: torchvision:resnet18 with the 32-pixel stem,
or resnet_small width 16) over --rows random 32x32 rows at the rows per forward
`unlearning.heap.rows_per_forward` picks, best of --repeats after a warm-up pass, and how many
predictions the two precisions share.

    .venv/bin/python -m benchmarks.inference_precision                        # ResNet-18, 1,024 rows
    .venv/bin/python -m benchmarks.inference_precision --arch resnet_small --rows 5000
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from unlearning.heap import rows_per_forward
from unlearning.metrics import EVAL_BATCH
from unlearning.models import build_model
from unlearning.passes import predict_outcomes


def timed_pass(model, inputs: torch.Tensor, precision: str, repeats: int):
    batches = [(inputs[i : i + EVAL_BATCH], None) for i in range(0, len(inputs), EVAL_BATCH)]
    predict_outcomes([model], batches[:1], precision=precision)  # warm-up: oneDNN picks its kernels
    best, found = float("inf"), None
    for _ in range(repeats):
        started = time.perf_counter()
        [found] = predict_outcomes([model], batches, precision=precision)
        best = min(best, time.perf_counter() - started)
    return best, found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="torchvision:resnet18")
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_model(args.arch, 10, (3, 32, 32), **({"width": 16} if args.arch == "resnet_small" else {})).eval()
    inputs = torch.randn(args.rows, 3, 32, 32)
    fp32_seconds, fp32 = timed_pass(model, inputs, "fp32", args.repeats)
    bf16_seconds, bf16 = timed_pass(model, inputs, "bf16", args.repeats)
    print(json.dumps({
        "arch": args.arch, "rows": args.rows, "threads": args.threads,
        "rows_per_forward": rows_per_forward(model, inputs[:EVAL_BATCH], EVAL_BATCH),
        "fp32_seconds": round(fp32_seconds, 3), "bf16_seconds": round(bf16_seconds, 3),
        "speedup": round(fp32_seconds / bf16_seconds, 2),
        "same_prediction": round(float((fp32.pred == bf16.pred).double().mean()), 4),
    }))


if __name__ == "__main__":
    main()
