"""Step 3: what each Ray Train worker runs — partial (sum, count), then one all-reduce.

The maths is `unlearning.compute_importance_sums`; a worker only regroups its Ray Data blocks
into the fixed batches it owns, reports progress, and adds its partial sums to the others'.
"""

from __future__ import annotations

import re
import time

import numpy as np
import torch

import unlearning
from unlearning.errors import UserError


class RunChannel:
    """Driver-owned actor: workers report progress and user errors; rank 0 leaves the result."""

    def __init__(self):
        self.rows: dict[int, int] = {}
        self.windows: dict[int, tuple[float, float]] = {}  # rank -> (first batch ready, done)
        self.result = None
        self.user_error: str | None = None

    def progress(self, rank: int, rows: int) -> None:
        self.rows[rank] = rows

    def rows_done(self) -> int:
        return sum(self.rows.values())

    def finished(self, rank: int, first_batch: float, done: float) -> None:
        self.windows[rank] = (first_batch, done)

    def streaming_seconds(self) -> float | None:
        """From the first batch ready on any worker to the last worker done (startup excluded)."""
        if not self.windows:
            return None
        return max(d for _, d in self.windows.values()) - min(f for f, _ in self.windows.values())

    def fail(self, message: str) -> None:
        self.user_error = self.user_error or message

    def get_user_error(self) -> str | None:
        return self.user_error

    def put_result(self, result: dict) -> None:
        self.result = result

    def get_result(self) -> dict | None:
        return self.result


def whole_batches(shard, plan):
    """(inputs, labels) for each fixed batch of this worker, regrouped from Ray Data blocks."""
    pending: dict[int, list[dict]] = {}
    for block in shard.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2):
        for batch_index in np.unique(block["batch_index"]).tolist():
            rows = block["batch_index"] == batch_index
            pending.setdefault(batch_index, []).append({k: block[k][rows] for k in ("row_index", "inputs", "label")})
            if sum(len(p["row_index"]) for p in pending[batch_index]) == plan.batch_rows(batch_index):
                yield stack_in_row_order(pending.pop(batch_index))
    if pending:  # chunks hold whole batches, so this is a bug, never a data problem
        raise RuntimeError(f"batches {sorted(pending)[:5]} reached this worker incomplete")


def stack_in_row_order(parts: list[dict]):
    row_index = np.concatenate([p["row_index"] for p in parts])
    order = np.argsort(row_index, kind="stable")
    inputs = np.concatenate([p["inputs"] for p in parts])[order]
    labels = np.concatenate([p["label"] for p in parts])[order]
    return torch.from_numpy(np.ascontiguousarray(inputs)), torch.from_numpy(np.ascontiguousarray(labels))


def any_batches(shard, batch_size: int):
    for block in shard.iter_batches(batch_size=batch_size, batch_format="numpy", prefetch_batches=2):
        yield torch.from_numpy(np.array(block["inputs"])), torch.from_numpy(np.array(block["label"]))


def user_error_message(error: BaseException) -> str | None:
    """The one-line message of a UserError somewhere in `error`'s chain, else None.

    Ray Data wraps a decoder's exception in a UserCodeException whose cause does not survive
    the trip to this process; only the remote traceback's text does, ending in the UserError's
    own line, which is what is read then."""
    seen, texts = set(), []
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, UserError) and not isinstance(error, ray_errors()):
            return str(error).strip().splitlines()[-1]
        texts.append(str(error))
        error = error.__cause__ or error.__context__
    for text in texts:
        found = _REMOTE_USER_ERROR.findall(text)
        if found:
            return found[-1].strip()
    return None


_REMOTE_USER_ERROR = re.compile(rf"^{re.escape(UserError.__module__)}\.UserError: (.+)$", re.MULTILINE)


def ray_errors() -> tuple[type, ...]:
    """Ray's exception classes (a RayTaskError can also be an instance of its cause's class)."""
    from ray.exceptions import RayError

    return (RayError,)


class WorkerProgress:
    """Counts this worker's rows, tells the driver now and then, and times the streaming part.

    `fault(rank, rows_done)` runs after every batch: a test passes one to kill a worker.
    """

    def __init__(self, channel, rank: int, fault=None):
        self.channel, self.rank, self.rows, self.fault = channel, rank, 0, fault
        self.first_batch: float | None = None  # when the first batch was ready (startup done)
        self.last_report = 0.0
        channel.progress.remote(rank, 0)

    def timed(self, batches):
        for batch in batches:
            if self.first_batch is None:
                self.first_batch = time.time()
            yield batch

    def on_batch(self, size: int) -> None:
        self.rows += size
        if self.fault is not None:
            self.fault(self.rank, self.rows)
        if time.monotonic() - self.last_report > 0.5:
            self.channel.progress.remote(self.rank, self.rows)
            self.last_report = time.monotonic()

    def done(self) -> None:
        self.channel.progress.remote(self.rank, self.rows)
        self.channel.finished.remote(self.rank, self.first_batch or time.time(), time.time())


def importance_worker(config: dict) -> None:
    """Runs in each Ray Train worker: partial sums over this worker's batches, then all-reduce."""
    import ray
    import ray.train
    import ray.train.torch

    context = ray.train.get_context()
    rank = context.get_world_rank()
    channel, plan = config["channel"], config["plan"]
    if ray.get(channel.get_user_error.remote()):
        raise UserError("an earlier attempt already failed on the input")  # do not retry input errors
    # a GPU the cluster declares but CUDA cannot see (a CPU node with `num_gpus`): run on CPU
    device = ray.train.torch.get_device() if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cpu":
        torch.set_num_threads(config["threads"])
    model = ray.get(config["model"]).to(device)  # from the object store: no path on the driver's disk
    shard = ray.train.get_dataset_shard(f"rank{rank}")
    batches = whole_batches(shard, plan) if config["mode"] == "batch" else any_batches(shard, plan.batch_size)
    if config["channels_last"]:  # the same memory layout as load_dataset's, hence the same rounding
        batches = ((x.contiguous(memory_format=torch.channels_last), y) for x, y in batches)
    progress = WorkerProgress(channel, rank, config.get("fault"))
    try:
        partial = unlearning.compute_importance_sums(
            model, progress.timed(batches), kind=config["kind"], mode=config["mode"], device=device,
            on_batch=progress.on_batch,
        )
    except Exception as error:
        message = user_error_message(error)
        if message:
            ray.get(channel.fail.remote(message))
        raise
    progress.done()
    total = all_reduce_sums(partial, device, context.get_world_size())
    if rank == 0:
        ray.get(channel.put_result.remote(total))


def all_reduce_sums(partial, device, world: int) -> dict:
    """One all-reduce of [every sum, flattened | count | samples], all float64: exact to ~1e-16."""
    import torch.distributed as dist

    names = sorted(partial.sums)
    flat = torch.cat(
        [partial.sums[name].flatten() for name in names]
        + [torch.tensor([partial.count, partial.num_samples], dtype=torch.float64)]
    ).to(device)
    if world > 1:
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat = flat.cpu()
    sums, offset = {}, 0
    for name in names:
        size = partial.sums[name].numel()
        sums[name] = flat[offset : offset + size].view_as(partial.sums[name]).clone()
        offset += size
    count, samples = (int(round(v)) for v in flat[offset:].tolist())
    return {"sums": sums, "count": count, "num_samples": samples}

