"""Data left in its files (`open_dataset`) and the in-process executor: the same numbers as in memory."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import unlearning
from unlearning.data import RowInputs, open_dataset
from unlearning.evaluation import evaluate_models
from unlearning.metrics import entropy, membership_inference, predict_logits
from unlearning.passes import LocalExecutor

NORMALIZE_RGB = {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3]}
SPECS = ["digits", "digits+poison:rate=0.05,identified=0.5", "digits+coarse:0,1,2,3,4/5,6,7,8,9",
         "parquet_file", "parquet_dir", "image_folder", "parquet_dir+poison:rate=0.1"]


def spec_of(name: str, request) -> str:
    base, _, modifier = name.partition("+")
    spec = base if base == "digits" else str(request.getfixturevalue(base))
    return spec + ("+" + modifier if modifier else "")


def all_batches(split, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    parts = list(split.batches(**kwargs))
    return torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts])


@pytest.mark.parametrize("name", SPECS)
def test_a_data_set_left_in_its_files_gives_the_rows_the_in_memory_loader_gives(name, request):
    spec = spec_of(name, request)
    in_memory, lazy = unlearning.load_dataset(spec), open_dataset(spec)
    assert isinstance(lazy.train.inputs, RowInputs) and lazy.fingerprint == in_memory.fingerprint
    assert lazy.input_shape == in_memory.input_shape and lazy.num_classes == in_memory.num_classes
    normalize = NORMALIZE_RGB if in_memory.input_shape[0] == 3 else {"mean": [0.3], "std": [0.4]}
    for which in ("train", "test"):
        a, b = getattr(in_memory, which), getattr(lazy, which)
        assert torch.equal(a.ids, b.ids) and torch.equal(a.labels, b.labels)
        for kwargs in ({"batch_size": 7}, {"batch_size": 16, "shuffle": True, "seed": 3}):
            expected, got = all_batches(a, normalize=normalize, **kwargs), all_batches(b, normalize=normalize, **kwargs)
            assert torch.equal(expected[0], got[0]) and torch.equal(expected[1], got[1])
    n = len(in_memory.train)
    scattered = torch.tensor([n - 1, 3, 0, n // 2, 3])  # any order, repeats
    assert torch.equal(in_memory.train.subset(scattered).inputs, lazy.train.subset(scattered).inputs.read())
    if in_memory.poison is not None:
        assert torch.equal(all_batches(in_memory.poison.triggered_test)[0], all_batches(lazy.poison.triggered_test)[0])

        def flip(x):
            return x.flip(-1)

        augmented = [all_batches(d.train, batch_size=8, shuffle=True, augment=flip)[0] for d in (in_memory, lazy)]
        assert torch.equal(*augmented)  # the trigger re-stamped after augmentation, from clean rows read back


def test_normalisation_statistics_streamed_over_blocks_match_the_in_memory_ones(parquet_file):
    in_memory, lazy = unlearning.load_dataset(parquet_file), open_dataset(parquet_file)
    expected, got = in_memory.normalization(), lazy.normalization()
    for key in ("mean", "std"):
        np.testing.assert_allclose(got[key], expected[key], atol=2e-6)


def test_joined_views_of_one_table_stay_unread(parquet_file):
    train = open_dataset(parquet_file).train
    first, second = train.subset(torch.arange(0, 10)), train.subset(torch.arange(50, 55))
    joined = first.concat(second)
    assert isinstance(joined.inputs, RowInputs) and len(joined) == 15
    assert torch.equal(joined.inputs.read(), torch.cat([first.inputs.read(), second.inputs.read()]))


def test_local_outcomes_are_the_logits_argmax_and_entropy(digits_checkpoint):
    model = unlearning.load_model(digits_checkpoint)
    lazy = open_dataset("digits").train
    normalize = unlearning.model_meta(model).get("normalize")
    [outcomes] = LocalExecutor(cache_bytes=0).outcomes([model], lazy, normalize)
    logits = predict_logits(model, unlearning.load_dataset("digits").train, normalize)
    assert torch.equal(outcomes.pred, logits.argmax(dim=1))
    torch.testing.assert_close(outcomes.entropy, entropy(logits), rtol=0, atol=1e-12)


def test_evaluation_from_outcomes_matches_the_logit_formulas(digits_checkpoint):
    """Accuracies, per-class accuracy and the MIA as computed from full logits, on both loaders."""
    model = unlearning.load_model(digits_checkpoint)
    normalize = unlearning.model_meta(model).get("normalize")
    in_memory = unlearning.load_dataset("digits")
    forget = unlearning.parse_forget("class:4", in_memory)
    retain_split, forget_split = unlearning.data.split_forget(in_memory, forget)
    logits = {name: predict_logits(model, split, normalize)
              for name, split in (("retain", retain_split), ("forget", forget_split), ("test", in_memory.test))}
    for dataset in (in_memory, open_dataset("digits")):
        [metrics] = evaluate_models([model], dataset, forget, normalize, executor=LocalExecutor(cache_bytes=1 << 20))
        assert metrics["retain_acc"] == float((logits["retain"].argmax(1) == retain_split.labels).double().mean())
        assert metrics["forget_acc"] == float((logits["forget"].argmax(1) == forget_split.labels).double().mean())
        assert metrics["mia"] == membership_inference(logits["retain"], logits["forget"], logits["test"])
        test_correct = logits["test"].argmax(1) == in_memory.test.labels
        assert metrics["per_class_test_acc"][4] == float(test_correct[in_memory.test.labels == 4].double().mean())
        assert metrics["test_forget_acc"] == metrics["per_class_test_acc"][4]


def test_the_local_cache_keeps_only_small_splits(digits_checkpoint):
    model = unlearning.load_model(digits_checkpoint)
    train = open_dataset("digits").train
    executor = LocalExecutor(cache_bytes=100 * 64 * 4)  # room for 100 digits rows
    small, large = train.subset(torch.arange(100)), train.subset(torch.arange(500))
    executor.outcomes([model], small, None)
    executor.outcomes([model], large, None)
    assert [entry[0] for entry in executor._cached.values()] == [small]
    first = executor.outcomes([model], small, None)[0]
    assert torch.equal(first.pred, executor.outcomes([model], small, None)[0].pred)
