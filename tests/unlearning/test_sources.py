"""Where rows live (unlearning.data.sources): one reader, one decoder, one fingerprint."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

import unlearning
from unlearning.data import decode_rows, open_source

SOURCES = ["digits", "parquet_file", "parquet_dir", "image_folder"]


def spec_of(source, request) -> str:
    return "digits" if source == "digits" else str(request.getfixturevalue(source))


def test_fingerprints_are_those_of_earlier_releases():
    """Stores made before the row sources were unified must still match their data."""
    assert unlearning.load_dataset("digits").fingerprint == "16312236bf3fced6"
    assert unlearning.load_dataset("digits+poison:rate=0.05,seed=1").fingerprint == "9be63914279f035f"
    assert unlearning.load_dataset("digits+coarse:0,1,2,3,4/5,6,7,8,9").fingerprint == "62e694139e0ff6cf"


def test_a_train_test_directory_is_fingerprinted_by_its_two_files(parquet_dir):
    digests = [hashlib.sha256((parquet_dir / f"{s}.parquet").read_bytes()).digest() for s in ("train", "test")]
    expected = hashlib.sha256(digests[0] + digests[1]).hexdigest()[:16]
    assert open_source(parquet_dir).fingerprint == expected == unlearning.load_dataset(parquet_dir).fingerprint


@pytest.mark.parametrize("source", SOURCES)
def test_described_rows_are_the_loaded_rows_in_order(source, request):
    """Read in two uneven pieces that cross row groups, decode: exactly load_dataset's rows."""
    spec = spec_of(source, request)
    described, dataset = open_source(spec), unlearning.load_dataset(spec)
    assert described.fingerprint == dataset.fingerprint
    for rows, split in ((described.train, dataset.train), (described.test, dataset.test)):
        assert len(rows) == len(split)
        cut = max(1, len(rows) // 3)
        pieces = [decode_rows(rows.read(0, cut), spec), decode_rows(rows.read(cut), spec)]
        for i, column in enumerate((split.ids, split.inputs, split.labels)):
            assert np.array_equal(np.concatenate([p[i].numpy() for p in pieces]), column.numpy())


@pytest.mark.parametrize("source", SOURCES)
def test_selected_rows_are_those_training_rows_however_scattered(source, request):
    """A forget set's rows: scattered over row groups, read back exactly, in order."""
    spec = spec_of(source, request)
    rows = open_source(spec).train
    train = unlearning.load_dataset(spec).train
    positions = np.sort(np.random.default_rng(5).choice(len(rows), size=len(rows) // 3, replace=False))
    chosen = rows.select(positions)
    assert len(chosen) == len(positions)
    ids, inputs, labels = decode_rows(chosen.read(), spec)
    assert np.array_equal(ids.numpy(), train.ids.numpy()[positions])
    assert np.array_equal(labels.numpy(), train.labels.numpy()[positions])
    assert np.array_equal(inputs.numpy(), train.inputs.numpy()[positions])


def test_a_held_out_source_keeps_a_fifth_for_testing(parquet_file):
    source = open_source(parquet_file)
    assert source.held_out and (len(source.train), len(source.test)) == (160, 40)
    assert not set(source.train.file_rows()) & set(source.test.file_rows())
