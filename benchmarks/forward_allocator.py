"""One forward pass over rows with and without `unlearning.heap.keep_freed_memory`, at several
rows per forward.

A search step is one forward pass over D_f. This times eval-mode forwards of a fresh network
(--arch: resnet_small width 16, or e.g. torchvision:resnet18) over --rows random 32x32 rows,
each variant in a fresh process (the allocator setting is process-wide and cannot be undone),
and reports seconds per pass (best of --repeats, after a warm-up pass) and minor page faults
per row; and the rows per forward `unlearning.heap.rows_per_forward` picks for the network.

    .venv/bin/python -m benchmarks.forward_allocator                  # 1 thread, 2,500 rows
    .venv/bin/python -m benchmarks.forward_allocator --arch torchvision:resnet18 --rows 512
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def network(arch: str):
    from unlearning.models import build_model

    return build_model(arch, 10, (3, 32, 32), **({"width": 16} if arch == "resnet_small" else {})).eval()


def one_variant(arch: str, keep: bool, batch: int, rows: int, threads: int, repeats: int) -> dict:
    import torch

    from unlearning.heap import keep_freed_memory

    if keep:
        keep_freed_memory()
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = network(arch)
    inputs = torch.randn(rows, 3, 32, 32)

    @torch.no_grad()
    def one_pass():
        return [model(inputs[i : i + batch]).argmax(1) for i in range(0, rows, batch)]

    one_pass()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        one_pass()
        times.append(time.perf_counter() - start)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    return {"keep": keep, "batch": batch, "seconds": min(times), "faults_per_row": faults / (rows * repeats)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet_small")
    parser.add_argument("--rows", type=int, default=2500)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batches", type=int, nargs="+", default=[512, 256, 128, 64])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one variant, print JSON
    args = parser.parse_args(argv)
    if args.one:
        keep, batch = args.one.split(":")
        print(json.dumps(one_variant(args.arch, keep == "keep", int(batch), args.rows, args.threads, args.repeats)))
        return
    import torch

    from unlearning.heap import rows_per_forward

    chosen = rows_per_forward(network(args.arch), torch.zeros(1, 3, 32, 32), 256)
    print(f"{args.arch}, {args.rows} rows, {args.threads} thread(s), best of {args.repeats}; "
          f"rows_per_forward picks {chosen}")
    print("| allocator | rows per forward | s per pass | minor faults per row |")
    print("|---|---:|---:|---:|")
    for keep in ("default", "keep"):
        for batch in args.batches:
            out = subprocess.run(
                [sys.executable, "-m", "benchmarks.forward_allocator", "--one", f"{keep}:{batch}",
                 "--arch", args.arch, "--rows", str(args.rows), "--threads", str(args.threads), "--repeats", str(args.repeats)],
                check=True, capture_output=True, text=True,
            ).stdout
            found = json.loads(out.strip().splitlines()[-1])
            label = "keep_freed_memory" if found["keep"] else "glibc default"
            print(f"| {label} | {batch} | {found['seconds']:.2f} | {found['faults_per_row']:.0f} |")


if __name__ == "__main__":
    main()
