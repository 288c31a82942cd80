"""A whole deletion request's memory against the data set's size: the driver holds no rows.

Generates Parquet data sets of N rows of 256 float32 features (10 Gaussian classes, written
once under benchmarks/cache/), trains one `mlp` on the smallest, then runs one
`unlearn forget --forget class:3` per size in a fresh process, sampling every 0.2 s the
private memory (RssAnon) of the driver and of every Ray worker process it started (not those
of another Ray session on the machine). Reported per size: the driver's peak RssAnon, each
kind of Ray worker's peak, and the request's wall time split by pass (from report.json).

    .venv/bin/python -m benchmarks.request_memory                      # 20,000 and 300,000 rows
    .venv/bin/python -m benchmarks.request_memory --rows 20000 300000 --method ptn
    .venv/bin/python -m benchmarks.request_memory --ray-min-rows 0 \
        --out benchmarks/results/request-memory-all-on-ray.json   # the same passes on Ray at both sizes
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / "benchmarks" / "cache" / "request_memory"
FEATURES, CLASSES = 256, 10


def generated(rows: int) -> Path:
    """A Parquet file of `rows` rows (seeded; row groups of 10,000), written once."""
    path = CACHE / f"features-{rows}.parquet"
    if path.exists():
        return path
    import pyarrow as pa
    import pyarrow.parquet as pq

    CACHE.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(CLASSES, FEATURES)).astype(np.float32)
    partial = path.with_suffix(".partial")
    with pq.ParquetWriter(partial, pa.schema([("id", pa.int64()), ("label", pa.int64()),
                                              ("features", pa.list_(pa.float32()))])) as writer:
        for start in range(0, rows, 10_000):
            n = min(10_000, rows - start)
            labels = rng.integers(0, CLASSES, n)
            values = centres[labels] + 2.0 * rng.normal(size=(n, FEATURES)).astype(np.float32)
            column = pa.FixedSizeListArray.from_arrays(pa.array(values.ravel()), FEATURES).cast(pa.list_(pa.float32()))
            writer.write_table(pa.table({"id": np.arange(start, start + n), "label": labels, "features": column}))
    partial.rename(path)
    return path


def private_memory() -> dict[int, tuple[str, float]]:
    """pid -> (process title, RssAnon in MiB) of every readable process."""
    from benchmarks.importance_throughput import processes

    return {pid: (title, private) for pid, title, _, private, _ in processes()}


def descends_from(pid: int, root: int) -> bool:
    """Whether process `pid` is `root` or below it: a request's Ray workers are children of the
    raylet it started, so Ray processes of anyone else's session on the machine are not counted."""
    while pid > 1:
        if pid == root:
            return True
        try:  # field 4 of /proc/PID/stat: the parent
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            return False
    return False


def worker_kind(title: str) -> str | None:
    if not title.startswith("ray::"):
        return None
    name = title[5:].split(".")[0].split(":")[0]
    return name if name and not name.startswith("IDLE") else "idle worker"


def run_request(model: Path, data: Path, method: str, out: Path, ray_min_rows: int | None = None) -> dict:
    command = [sys.executable, "-m", "pipelines.cli", "--quiet", "forget", "--model", str(model), "--data", str(data),
               "--forget", "class:3", "--method", method, "--no-track", "--out", str(out),
               "--accept-unmet"]  # memory is measured here: a missed target (exit 3) is not a failure
    if ray_min_rows is not None:
        command += ["--ray-min-rows", str(ray_min_rows)]
    started = time.monotonic()
    process = subprocess.Popen(command, cwd=REPO)
    peaks: dict[str, float] = {}
    ours: set[int] = set()  # the request's Ray processes found so far
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            for pid, (title, rss) in private_memory().items():
                if pid == process.pid:
                    peaks["driver"] = max(peaks.get("driver", 0), rss)
                elif (kind := worker_kind(title)) and (pid in ours or descends_from(pid, process.pid)):
                    ours.add(pid)
                    peaks[kind] = max(peaks.get(kind, 0), rss)
            stop.wait(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    code = process.wait()
    stop.set()
    sampler.join()
    if code != 0:
        raise SystemExit(f"the request on {data} failed (exit {code})")
    report = json.loads((out / "report.json").read_text())
    return {"wall_seconds": round(time.monotonic() - started, 1), "peak_rss_anon_mib": {k: round(v) for k, v in peaks.items()},
            "seconds": report["seconds"], "importance_on_ray": report["importance"]["on_ray"],
            "passes_on_ray": report.get("passes_on_ray", []), "metrics": report["metrics"]}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[20_000, 300_000])
    parser.add_argument("--method", default="ptn")
    parser.add_argument("--ray-min-rows", type=int, default=None,
                        help="passed to the requests (0: every pass on Ray at both sizes; default: the CLI's)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "request-memory.json"))
    args = parser.parse_args(argv)
    data = {rows: generated(rows) for rows in args.rows}
    model = CACHE / f"mlp-{min(args.rows)}"
    if not model.exists():
        subprocess.run([sys.executable, "-m", "pipelines.cli", "--quiet", "train", "--data", str(data[min(args.rows)]),
                        "--arch", "mlp", "--epochs", "3", "--out", str(model)], cwd=REPO, check=True)
    results = {"command": " ".join([Path(sys.executable).name, "-m", "benchmarks.request_memory", *(argv or sys.argv[1:])]),
               "cpus": os.cpu_count(), "runs": {}}
    with tempfile.TemporaryDirectory() as scratch:
        for rows, path in data.items():
            results["runs"][rows] = run_request(model, path, args.method, Path(scratch) / f"run-{rows}", args.ray_min_rows)
            print(rows, json.dumps(results["runs"][rows]["peak_rss_anon_mib"]), results["runs"][rows]["wall_seconds"], "s")
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
