"""Throughput of distributed importance against a bare single-process PyTorch loop.

Same model (resnet_small, width 16), same rows (the first --rows of CIFAR-10's train split,
read from --data, by default ../shared/data/cifar10 next to the repository),
same batch size, kind and mode, same total cores: the bare loop runs with all of them as torch
threads and with one (the faster is the baseline); the pipeline gives its workers the same cores
(1 worker x 2 threads, 2 workers x 1).
Both decode PNGs and normalise. Reported per run:
  end-to-end rows/s   wall time of the call, Ray Train/Data start-up included
  streaming rows/s    from the first batch ready on any worker to the last worker done
  peak RSS            driver, Train workers, Ray Data actors: VmHWM (counts object-store pages
                      a process has mapped) and the highest private RssAnon sampled (its heap)
  page faults         minor page faults of the Train workers, per row (their whole lives)
With several modes (--mode batch per_sample) the pipeline runs each with the same workers, one
after the other, and prints each mode's rows/s against the first's.

    .venv/bin/python -m benchmarks.importance_throughput            # all 50,000 training rows
    .venv/bin/python -m benchmarks.importance_throughput --rows 10000 --workers 2 --no-bare \
        --mode batch per_sample                                     # per-sample against batch
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

import unlearning
from benchmarks.common import CIFAR10
from pipelines.distributed import compute_importance_on_ray
from pipelines.ray_session import available_cpus, ensure_ray
from unlearning.checkpoint import model_meta
from unlearning.data import normalize_batch
from unlearning.data.sources import decode_image

CIFAR_NORMALIZE = {"mean": [0.4914, 0.4822, 0.4465], "std": [0.247, 0.2435, 0.2616]}


def processes():
    """(pid, title, peak RSS, current private RSS, minor page faults) of every readable process,
    from /proc; RSS in MiB.

    Peak RSS (VmHWM) counts shared pages too, including Ray's object store mapped into a
    process that reads from it; private RSS (RssAnon) is the process's own heap.
    """
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            title = (entry / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            status = (entry / "status").read_text()
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = {line.split(":")[0]: line.split()[1] for line in status.splitlines() if line.startswith(("VmHWM:", "RssAnon:"))}
        minor_faults = int(stat.rsplit(")", 1)[1].split()[7])  # field 10 of /proc/PID/stat
        if len(fields) == 2:
            yield int(entry.name), title, int(fields["VmHWM"]) / 1024, int(fields["RssAnon"]) / 1024, minor_faults


class PeakRss:
    """Samples peak RSS (VmHWM), private RSS (RssAnon) and minor page faults of this process
    and Ray's workers, 5/s."""

    def __init__(self):
        self.peaks: dict[str, float] = {}
        self.private: dict[str, float] = {}  # highest RssAnon seen
        self._faults: dict[tuple[str, int], int] = {}  # (kind, pid): last count seen
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _kind(pid: int, title: str) -> str | None:
        if pid == os.getpid():
            return "driver"
        if "RayTrainWorker" in title:
            return "train_worker"
        if "MapBatches" in title:
            return "data_task"
        return None

    def _run(self):
        while True:
            for pid, title, peak, private, minor_faults in processes():
                kind = self._kind(pid, title)
                if kind:
                    self.peaks[kind] = max(self.peaks.get(kind, 0.0), peak)
                    self.private[kind] = max(self.private.get(kind, 0.0), private)
                    self._faults[kind, pid] = minor_faults
            if self._stop.wait(0.2):
                return

    def faults(self, kind: str) -> int:
        """Minor page faults of every `kind` process seen, as last sampled (a process that
        exits loses its last 0.2 s; the driver's count includes everything before)."""
        return sum(count for (seen, _), count in self._faults.items() if seen == kind)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def make_subset(rows: int, directory: Path, source: Path = CIFAR10) -> Path:
    """train.parquet = the first `rows` CIFAR-10 training rows; test.parquet = 100 test rows."""
    data = directory / f"cifar10-{rows}"
    data.mkdir()
    train = pq.ParquetFile(source / "train.parquet")
    writer = None
    taken = 0
    for batch in train.iter_batches(batch_size=1000):
        batch = batch.slice(0, rows - taken)
        if writer is None:
            writer = pq.ParquetWriter(data / "train.parquet", batch.schema)
        writer.write_batch(batch, row_group_size=1000)
        taken += len(batch)
        if taken >= rows:
            break
    writer.close()
    pq.write_table(pq.read_table(source / "test.parquet").slice(0, 100), data / "test.parquet")
    return data


def bare_loop(model_path: Path, data: Path, kind: str, mode: str, batch_size: int, threads: int):
    """Decode + normalise + compute_importance_sums in one process, streaming the Parquet file."""
    torch.set_num_threads(threads)
    model = unlearning.load_model(model_path)
    normalize = model_meta(model)["normalize"]

    def batches():  # fixed batches of consecutive rows, as Split.batches forms them
        images, labels = [], []
        for record_batch in pq.ParquetFile(data / "train.parquet").iter_batches(batch_size=batch_size):
            images += record_batch.column("image").to_pylist()
            labels += record_batch.column("label").to_pylist()
            while len(images) >= batch_size:
                yield decoded(images[:batch_size], labels[:batch_size])
                images, labels = images[batch_size:], labels[batch_size:]
        if images:
            yield decoded(images, labels)

    def decoded(images, labels):
        inputs = torch.from_numpy(np.stack([decode_image(b) for b in images]))
        return normalize_batch(inputs, normalize), torch.tensor(labels, dtype=torch.int64)

    started = time.perf_counter()
    sums = unlearning.compute_importance_sums(model, batches(), kind, mode)
    return sums, time.perf_counter() - started


def worst_relative_difference(a: unlearning.ImportanceSums, b: unlearning.ImportanceSums) -> float:
    return max(float((a.sums[n] - b.sums[n]).abs().max() / b.sums[n].abs().max()) for n in b.sums)


@dataclass
class Setup:
    """One measurement's inputs: the saved model, the data subset and the importance settings."""

    model: Path
    data: Path
    rows: int
    kind: str
    mode: str
    batch_size: int
    print_fn: Callable = print


def bare_runs(setup: Setup, cores: int) -> tuple[list[dict], float, unlearning.ImportanceSums | None]:
    """The bare loop with all cores as threads and with one: (rows, best rows/s, its sums)."""
    results, bare_rate, reference = [], 0.0, None
    rows = setup.rows
    for threads in sorted({cores, 1}, reverse=True):
        with PeakRss() as memory:
            sums, seconds = bare_loop(setup.model, setup.data, setup.kind, setup.mode, setup.batch_size, threads)
        if rows / seconds > bare_rate:
            bare_rate, reference = rows / seconds, sums
        results.append({
            "variant": f"bare loop, {threads} thread(s)", "threads": threads, "seconds": seconds,
            "rows_per_s": rows / seconds, "peak_rss_mib": memory.peaks, "peak_private_mib": memory.private,
        })
        setup.print_fn(f"bare loop ({threads} thread(s)): {seconds:7.1f} s  {rows / seconds:7.1f} rows/s  "
                       f"driver peak RSS / private {memory.peaks['driver']:.0f} / {memory.private['driver']:.0f} MiB")
    for result in results:
        result["baseline"] = result["rows_per_s"] == bare_rate
    setup.print_fn(f"baseline: {bare_rate:.1f} rows/s")
    return results, bare_rate, reference


def ray_run(setup: Setup, n_workers: int, bare_rate: float, reference) -> dict:
    """The Ray pipeline with `n_workers` workers, compared with the bare loop's best if it ran."""
    rows = setup.rows
    with PeakRss() as memory:
        started = time.perf_counter()
        sums = compute_importance_on_ray(
            setup.model, setup.data, n_workers, setup.kind, setup.mode, setup.batch_size, progress=False
        )
        seconds = time.perf_counter() - started
    streaming = sums.meta["seconds_streaming"]
    peaks, private = memory.peaks, memory.private
    worker_faults = memory.faults("train_worker")
    result = {
        "variant": f"ray, {n_workers} worker(s)", "workers": n_workers, "mode": setup.mode,
        "seconds": seconds, "rows_per_s": rows / seconds, "streaming_seconds": streaming,
        "streaming_rows_per_s": rows / streaming, "peak_rss_mib": peaks, "peak_private_mib": private,
        "worker_minor_faults": worker_faults, "baseline": False,
    }
    line = (f"ray, {n_workers} worker(s), {setup.mode}: {seconds:7.1f} s  end-to-end {rows / seconds:7.1f} rows/s; "
            f"streaming {streaming:6.1f} s {rows / streaming:7.1f} rows/s; "
            f"worker page faults {worker_faults / rows:,.0f}/row")
    if reference is not None:
        result["vs_bare_end_to_end"] = rows / seconds / bare_rate
        result["vs_bare_streaming"] = rows / streaming / bare_rate
        result["worst_relative_difference"] = worst_relative_difference(sums, reference)
        line += (f" ({result['vs_bare_end_to_end']:4.0%} / {result['vs_bare_streaming']:4.0%} of bare; "
                 f"worst rel. diff vs bare {result['worst_relative_difference']:.1e})")
    setup.print_fn(line)
    setup.print_fn("    MiB peak RSS / peak private: " + ", ".join(
        f"{part} {peaks.get(part, 0):.0f} / {private.get(part, 0):.0f}"
        for part in ("driver", "train_worker", "data_task")))
    return result


def compare_modes(results: list[dict], print_fn: Callable = print) -> None:
    """Each mode's pipeline rows/s against the first mode's with the same workers, in place."""
    for result in results:
        first = next((r for r in results if "mode" in r and r["workers"] == result.get("workers")), None)
        if first is None or result is first:
            continue
        end_to_end = result["rows_per_s"] / first["rows_per_s"]
        streaming = result["streaming_rows_per_s"] / first["streaming_rows_per_s"]
        result[f"vs_{first['mode']}_end_to_end"], result[f"vs_{first['mode']}_streaming"] = end_to_end, streaming
        print_fn(f"{result['variant']}, {result['mode']} against {first['mode']}: {end_to_end:.2f}x end-to-end, "
                 f"{streaming:.2f}x streaming")


def measure(
    rows: int = 50_000,
    batch_size: int = 64,
    kind: str = "fisher",
    mode: str | list[str] = "batch",
    workers: list[int] | tuple[int, ...] = (1, 2),
    print_fn=print,
    bare: bool = True,
    data: Path = CIFAR10,
) -> list[dict]:
    """Run every variant once; one dict per variant (the bare loop's best is the baseline).

    `data` is a CIFAR-10 directory with train.parquet and test.parquet. With a list of modes the
    bare loop runs the first, and the pipeline every mode with each number of workers.
    """
    modes = [mode] if isinstance(mode, str) else list(mode)
    cores = available_cpus()
    scratch = Path(tempfile.mkdtemp(prefix="amnesis-bench-"))
    try:
        model = unlearning.new_model("resnet_small", 10, (3, 32, 32), CIFAR_NORMALIZE, seed=0, width=16)
        data = make_subset(rows, scratch, Path(data))
        setup = Setup(scratch / "model", data, rows, kind, modes[0], batch_size, print_fn)
        unlearning.save_model(model, setup.model)
        print_fn(f"{rows} CIFAR-10 rows, resnet_small w16, {kind}/{'+'.join(modes)}, batch {batch_size}, {cores} cores")
        # The baseline is the bare loop's best thread count within the same cores: on a loaded
        # machine OpenMP threads that outnumber the free cores can be several times slower.
        # Without the bare loop (bare=False, a memory sweep) there is no baseline.
        results, bare_rate, reference = bare_runs(setup, cores) if bare else ([], 0.0, None)
        ensure_ray()
        for n_workers in workers:  # the bare loop ran the first mode only
            results.append(ray_run(setup, n_workers, bare_rate, reference))
            results += [ray_run(replace(setup, mode=other), n_workers, 0.0, None) for other in modes[1:]]
        compare_modes(results, print_fn)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=50_000, help="first N training rows (default: all 50,000)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--kind", default="fisher")
    parser.add_argument("--mode", nargs="+", default=["batch"],
                        help="one mode, or several to run the pipeline in each with the same workers")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--no-bare", action="store_true", help="skip the bare loop (a memory sweep over --rows)")
    parser.add_argument("--data", default=str(CIFAR10),
                        help="CIFAR-10 with train.parquet and test.parquet (default: ../shared/data/cifar10)")
    args = parser.parse_args()
    if not (Path(args.data) / "train.parquet").exists():
        parser.error(f"data directory {args.data} not found; pass --data DIR "
                     "(a directory with train.parquet and test.parquet)")
    measure(args.rows, args.batch_size, args.kind, args.mode, args.workers, bare=not args.no_bare, data=args.data)


if __name__ == "__main__":
    main()
