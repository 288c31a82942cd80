"""The one place that builds data sets, forget sets and the benchmark tasks.

- `sources`: where rows live (digits, Parquet, a train/test directory, an image folder):
  describe, read chosen rows, decode, fingerprint. Every reader goes through it.
- `containers`: `Dataset` and `Split` in memory, mini-batches, the poison `Trigger`.
- `load`: `load_dataset(spec)`, the in-memory loader.
- `rows`: `open_dataset(spec)`, the same data set with inputs left in their files
  (`RowInputs`, read by the block); what a deletion request works on.
- `forget`: `ForgetSet` and `parse_forget` (class:K, random:N, id files, ...).
- `tasks`: benchmark modifiers (`+poison:...`, `+coarse:...`).
"""

from unlearning.data.containers import Dataset, Split, Trigger, add_trigger, normalize_batch
from unlearning.data.forget import (
    ForgetSet,
    forget_ids,
    parse_forget,
    parse_id,
    read_id_file,
    split_forget,
)
from unlearning.data.load import load_dataset, open_dataset
from unlearning.data.rows import RowInputs, Stamp
from unlearning.data.sources import (
    IMAGE_SUFFIXES,
    SPLIT_SEED,
    TEST_FRACTION,
    RowSource,
    SplitRows,
    decode_rows,
    fingerprint_bytes,
    open_source,
)
from unlearning.data.tasks import PoisonTask, coarse_task, poison_task

__all__ = [
    "IMAGE_SUFFIXES",
    "SPLIT_SEED",
    "TEST_FRACTION",
    "Dataset",
    "ForgetSet",
    "PoisonTask",
    "RowInputs",
    "RowSource",
    "Split",
    "SplitRows",
    "Stamp",
    "Trigger",
    "add_trigger",
    "coarse_task",
    "decode_rows",
    "forget_ids",
    "fingerprint_bytes",
    "load_dataset",
    "normalize_batch",
    "open_dataset",
    "open_source",
    "parse_forget",
    "poison_task",
    "parse_id",
    "read_id_file",
    "split_forget",
]
