"""Outcome passes on Ray: long-lived evaluator actors that read, decode and predict.

A request makes many outcome passes (the original's accuracy, one per search step, the final
metrics), so the actors live as long as the request: torch is imported once per actor, not
once per pass. Each pass streams the split through Ray Data's reader
(`RaySplit.dataset().streaming_split`), every actor decodes its share with the library's
decoder and returns, per model, each row's predicted class and entropy. A split seen a second
time is kept decoded (up to `KEEP_BYTES` an actor), so later passes over it, such as a
search's steps over D_f, read nothing at all. Kept rows live in Ray's object store, put there
by the actor that decoded them and read back without a copy at every pass: an actor's own
memory holds one chunk of rows at a time, and the kept rows are in the store Ray accounts
for (and spills to disk when it fills), freed when the split is dropped or the actor ends.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from unlearning.heap import keep_freed_memory
from unlearning.passes import EVAL_BATCH, Outcomes, predict_outcomes, rows_right

KEEP_BYTES = 512 << 20  # decoded rows an evaluator keeps between passes


class RowEvaluator:
    """One evaluator actor: its share of a split's rows in, each model's outcomes out, predicted
    in the request's inference precision."""

    def __init__(self, threads: int, precision: str = "fp32"):
        torch.set_num_threads(threads)
        self.precision = precision
        keep_freed_memory()  # a pass's blocks are reused, not faulted in again at every batch
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.kept: dict[str, list[tuple[np.ndarray, Stored]]] = {}  # (split rows, their inputs)
        self.walks: dict[str, tuple] = {}  # a search's model, importances and D_f labels, by key

    def ready(self) -> bool:
        return True

    def stream(self, key: str, shard, rows, model_refs: list, keep: bool):
        """Read and decode this actor's share, predict; keep the decoded rows if asked and they fit."""
        models = self._models(model_refs)
        parts, kept, size = [], [], 0
        for batch in shard.iter_batches(batch_size=rows.chunk_rows(), batch_format="pyarrow"):
            index, inputs, _ = rows.decode(batch)
            parts.append(self._predict(models, [(index, inputs)]))
            if keep:
                size += inputs.numel() * inputs.element_size()
                kept.append((index, Stored.put(inputs)))
                if size > KEEP_BYTES:  # too large to keep: stream it every time
                    keep, kept = False, []
        if keep:
            self.kept[key] = kept
        return self._join(parts, len(models)), keep

    def again(self, key: str, model_refs: list):
        """Outcomes over the rows kept under `key` (nothing is read)."""
        return self._join([self._predict(self._models(model_refs), self.kept[key])], len(model_refs))

    def load_shard(self, key: str, shard, rows) -> int:
        """Decode and keep what a streaming split hands this actor (its shard of a split)."""
        self.kept[key] = []
        for batch in shard.iter_batches(batch_size=rows.chunk_rows(), batch_format="pyarrow"):
            index, inputs, _ = rows.decode(batch)
            self.kept[key].append((index, Stored.put(inputs)))
        return sum(len(index) for index, _ in self.kept[key])

    def keep(self, key: str, blocks: list) -> int:
        """Keep rows decoded elsewhere, [(split row numbers, normalised inputs)], with any kept under `key`."""
        self.kept.setdefault(key, []).extend((index, Stored.put(inputs)) for index, inputs in blocks)
        return sum(len(index) for index, _ in self.kept[key])

    def give(self, key: str, count: int) -> list:
        """Hand over the last `count` rows kept under `key` (another actor keeps them): a search's
        shards are evened out this way, since a streaming split deals whole blocks."""
        blocks, given = self.kept[key], []
        while count > 0:
            index, stored = blocks.pop()
            inputs = stored.get()
            if len(index) > count:  # split the block: keep its head
                blocks.append((index[:-count], Stored.put(inputs[:-count])))
                index, inputs = index[-count:], inputs[-count:]
            given.append((index, inputs))
            count -= len(index)
        return given

    def walk(self, key: str, state: list, steps: list, allowed: int | None = None) -> list:
        """PTN steps on the rows kept under `key`: [(step, rows right, rows, rows read)] for each
        step; a step's pass stops once more than `allowed` rows are right (D_f's budget: with
        this shard alone past it, the whole of D_f is too).

        `state` is [model, (I^D, I^f), D_f's labels] as object-store references, fetched on
        this key's first walk and kept with its rows (a walk is called once per chunk of steps).
        """
        from unlearning.search import dampened_copy

        if key not in self.walks:
            import ray

            model, importances, labels = ray.get(state)
            index = np.concatenate([i for i, _ in self.kept[key]] or [np.empty(0, dtype=np.int64)])
            self.walks[key] = (model.to(self.device), importances, torch.from_numpy(labels[index]))
        model, (full, forget), truth = self.walks[key]
        path = []
        for step in steps:
            batches = _labelled(self.kept[key], truth)
            right, read = rows_right(dampened_copy(model, full, forget, step), batches, allowed, self.device,
                                     self.precision)
            path.append((step, right, len(truth), read))
        return path

    def drop(self, key: str) -> None:
        self.kept.pop(key, None)
        self.walks.pop(key, None)

    def _models(self, model_refs: list) -> list[torch.nn.Module]:
        import ray

        return [model.to(self.device) for model in ray.get(model_refs)]

    def _predict(self, models, blocks) -> tuple[np.ndarray, list[Outcomes]]:
        """Outcomes over [(split rows, inputs)], inputs a tensor or `Stored` (read as needed)."""
        index = np.concatenate([b[0] for b in blocks]) if blocks else np.empty(0, dtype=np.int64)
        batches = ((inputs[start : start + EVAL_BATCH], None) for inputs in _tensors(blocks)
                   for start in range(0, len(inputs), EVAL_BATCH))
        return index, predict_outcomes(models, batches, self.device, self.precision)

    @staticmethod
    def _join(parts, n_models: int) -> tuple[np.ndarray, list[Outcomes]]:
        if not parts:
            return np.empty(0, dtype=np.int64), [Outcomes.concat([]) for _ in range(n_models)]
        index = np.concatenate([p[0] for p in parts])
        return index, [Outcomes.concat([p[1][m] for p in parts]) for m in range(n_models)]


class Stored:
    """A block of decoded inputs in Ray's object store: put once, read back without a copy
    (a read-only view of the store's memory; a forward pass only reads its inputs)."""

    def __init__(self, ref, channels_last: bool):
        self.ref, self.channels_last = ref, channels_last

    @classmethod
    def put(cls, inputs: torch.Tensor) -> Stored:
        import ray

        # a channels-last block is stored as its memory is laid out (NHWC), to come back the same
        channels_last = (inputs.dim() == 4 and not inputs.is_contiguous()
                         and inputs.is_contiguous(memory_format=torch.channels_last))
        array = (inputs.permute(0, 2, 3, 1) if channels_last else inputs.contiguous()).numpy()
        return cls(ray.put(array), channels_last)

    def get(self) -> torch.Tensor:
        import ray

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            inputs = torch.from_numpy(ray.get(self.ref))
        return inputs.permute(0, 3, 1, 2) if self.channels_last else inputs


def _labelled(blocks, truth: torch.Tensor):
    """(inputs, labels) batches over kept blocks whose rows' labels are `truth`, in order."""
    start = 0
    for inputs in _tensors(blocks):
        for first in range(0, len(inputs), EVAL_BATCH):
            chunk = inputs[first : first + EVAL_BATCH]
            yield chunk, truth[start : start + len(chunk)]
            start += len(chunk)


def _tensors(blocks):
    for _, inputs in blocks:
        yield inputs.get() if isinstance(inputs, Stored) else inputs
