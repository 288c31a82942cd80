"""One outcome pass with and without `unlearning.heap.keep_freed_memory`, at several batch sizes.

A search step is one forward pass over D_f. This times `predict_outcomes` of a fresh
resnet_small (width 16) over --rows random 32x32 rows, each variant in a fresh process (the
allocator setting is process-wide and cannot be undone), and reports seconds per pass (best
of --repeats, after a warm-up pass) and minor page faults per row.

    .venv/bin/python -m benchmarks.forward_allocator                  # 1 thread, 2,500 rows
    .venv/bin/python -m benchmarks.forward_allocator --threads 2 --rows 5000
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def one_variant(keep: bool, batch: int, rows: int, threads: int, repeats: int) -> dict:
    import torch

    from unlearning.heap import keep_freed_memory
    from unlearning.models import build_model
    from unlearning.passes import predict_outcomes

    if keep:
        keep_freed_memory()
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_model("resnet_small", 10, (3, 32, 32), width=16)
    inputs = torch.randn(rows, 3, 32, 32)

    def one_pass():
        return predict_outcomes([model], ((inputs[i : i + batch], None) for i in range(0, rows, batch)))

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
    parser.add_argument("--rows", type=int, default=2500)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batches", type=int, nargs="+", default=[512, 256, 128, 64])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one variant, print JSON
    args = parser.parse_args(argv)
    if args.one:
        keep, batch = args.one.split(":")
        print(json.dumps(one_variant(keep == "keep", int(batch), args.rows, args.threads, args.repeats)))
        return
    print(f"{args.rows} rows, {args.threads} thread(s), best of {args.repeats}")
    print("| allocator | batch | s per pass | minor faults per row |")
    print("|---|---:|---:|---:|")
    for keep in ("default", "keep"):
        for batch in args.batches:
            out = subprocess.run(
                [sys.executable, "-m", "benchmarks.forward_allocator", "--one", f"{keep}:{batch}",
                 "--rows", str(args.rows), "--threads", str(args.threads), "--repeats", str(args.repeats)],
                check=True, capture_output=True, text=True,
            ).stdout
            found = json.loads(out.strip().splitlines()[-1])
            label = "keep_freed_memory" if found["keep"] else "glibc default"
            print(f"| {label} | {batch} | {found['seconds']:.2f} | {found['faults_per_row']:.0f} |")


if __name__ == "__main__":
    main()
