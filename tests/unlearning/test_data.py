"""Data sets, forget-set specs, and the sub-class and poison tasks."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import unlearning
from unlearning.data import coarse_task, poison_task, split_forget


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def image_parquet(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(50, 8, 8, 3), dtype=np.uint8)
    table = pa.table(
        {
            "id": pa.array(np.arange(1000, 1050), pa.int64()),
            "label": pa.array(np.arange(50) % 5, pa.int8()),
            "image": [png_bytes(a) for a in images],
        }
    )
    path = tmp_path / "images.parquet"
    pq.write_table(table, path)
    return path, images


def test_digits_is_real_and_split_reproducibly(digits):
    assert digits.num_classes == 10 and digits.input_shape == (1, 8, 8)
    assert len(digits.train) + len(digits.test) == 1797
    assert len(digits.test) == 359
    assert float(digits.train.inputs.min()) == 0.0 and float(digits.train.inputs.max()) == 1.0
    again = unlearning.load_dataset("digits")
    assert torch.equal(again.test.ids, digits.test.ids) and again.fingerprint == digits.fingerprint


def test_parquet_images_decode_exactly(image_parquet):
    path, images = image_parquet
    dataset = unlearning.load_dataset(path)
    assert dataset.input_shape == (3, 8, 8) and dataset.num_classes == 5
    assert len(dataset.train) == 40 and len(dataset.test) == 10
    row = int(torch.nonzero(dataset.train.ids == int(dataset.train.ids[0]))[0])
    original = images[int(dataset.train.ids[row]) - 1000]
    np.testing.assert_allclose(dataset.train.inputs[row].numpy().transpose(1, 2, 0), original / 255.0, rtol=1e-6)


def test_parquet_features_and_train_test_directory(tmp_path):
    for split, n in (("train", 30), ("test", 10)):
        table = pa.table(
            {"id": np.arange(n, dtype=np.int64), "label": np.arange(n) % 3, "features": [[float(i), 1.0] for i in range(n)]}
        )
        pq.write_table(table, tmp_path / f"{split}.parquet")
    dataset = unlearning.load_dataset(tmp_path)
    assert dataset.input_kind == "features" and dataset.input_shape == (2,)
    assert len(dataset.train) == 30 and len(dataset.test) == 10 and dataset.normalization() is None


def test_image_folder(tmp_path):
    rng = np.random.default_rng(1)
    for name in ("cat", "dog"):
        (tmp_path / name).mkdir()
        for i in range(5):
            Image.fromarray(rng.integers(0, 256, (6, 6), dtype=np.uint8)).save(tmp_path / name / f"{i}.png")
    dataset = unlearning.load_dataset(tmp_path)
    assert dataset.class_names == ["cat", "dog"] and dataset.input_shape == (1, 6, 6)
    assert len(dataset.train) + len(dataset.test) == 10


def test_bad_parquet_is_refused(tmp_path):
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"id": [1, 1], "label": [0, 1], "features": [[0.0], [1.0]]}), path)
    with pytest.raises(unlearning.UserError, match="duplicates"):
        unlearning.load_dataset(path)
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    with pytest.raises(unlearning.UserError, match="not a readable Parquet"):
        unlearning.load_dataset(tmp_path / "junk.parquet")
    with pytest.raises(unlearning.UserError, match="neither 'digits' nor an existing path"):
        unlearning.load_dataset(tmp_path / "missing")


def test_forget_specs(digits, tmp_path):
    by_class = unlearning.parse_forget("class:7", digits)
    assert by_class.kind == "class" and len(by_class.ids) == int((digits.train.labels == 7).sum())
    random_a = unlearning.parse_forget("random:25", digits, seed=3)
    assert len(random_a.ids) == 25
    assert torch.equal(random_a.ids, unlearning.parse_forget("random:25:3", digits).ids)
    assert not torch.equal(random_a.ids, unlearning.parse_forget("random:25:4", digits).ids)
    ids = digits.train.ids[:5].tolist()
    (tmp_path / "ids.txt").write_text("# a deletion request\n" + "\n".join(map(str, ids)) + "\n")
    assert unlearning.parse_forget(str(tmp_path / "ids.txt"), digits).ids.tolist() == sorted(ids)
    pq.write_table(pa.table({"id": pa.array(ids, pa.int64())}), tmp_path / "ids.parquet")
    assert unlearning.parse_forget(str(tmp_path / "ids.parquet"), digits).ids.tolist() == sorted(ids)
    retain, forget = split_forget(digits, by_class)
    assert len(retain) + len(forget) == len(digits.train) and bool((forget.labels == 7).all())


@pytest.mark.parametrize(
    "spec,message",
    [("class:10", "out of range"), ("class:-1", "out of range"), ("class:x", "not a class index"), ("random:0", "between")],
)
def test_bad_forget_specs_are_refused(digits, spec, message):
    with pytest.raises(unlearning.UserError, match=message):
        unlearning.parse_forget(spec, digits)


def test_empty_and_unknown_id_files_are_refused(digits, tmp_path):
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(unlearning.UserError, match="empty"):
        unlearning.parse_forget(str(tmp_path / "empty.txt"), digits)
    test_only_id = int(digits.test.ids[0])
    (tmp_path / "foreign.txt").write_text(f"{test_only_id}\n")
    with pytest.raises(unlearning.UserError, match="not in the training data"):
        unlearning.parse_forget(str(tmp_path / "foreign.txt"), digits)
    (tmp_path / "words.txt").write_text("12\nabc\n")
    with pytest.raises(unlearning.UserError, match="words.txt:2"):
        unlearning.parse_forget(str(tmp_path / "words.txt"), digits)


def test_subclass_task_keeps_fine_labels(digits):
    task = coarse_task(digits, [[0, 2, 4, 6, 8], [1, 3, 5, 7, 9]])
    assert task.num_classes == 2
    assert torch.equal(task.train.labels, digits.train.labels % 2)
    forget = unlearning.parse_forget("subclass:4", task)
    assert forget.kind == "subclass" and len(forget.ids) == int((digits.train.labels == 4).sum())
    with pytest.raises(unlearning.UserError, match="fine labels"):
        unlearning.parse_forget("subclass:4", digits)


def test_poison_task_is_seeded_and_follows_the_spec(digits):
    task = poison_task(digits, rate=0.02, identified_fraction=0.5, target=0, seed=1)
    n = round(0.02 * len(digits.train))
    assert len(task.poisoned_ids) == n and len(task.identified.ids) == round(0.5 * n)
    assert bool(torch.isin(task.identified.ids, task.poisoned_ids).all())
    rows = task.dataset.index_of(task.poisoned_ids)
    assert bool((task.dataset.train.labels[rows] == 0).all())
    assert bool((task.dataset.train.inputs[rows][..., -3:, -3:] == 1.0).all())
    assert bool((task.triggered_test.labels != 0).all())
    assert bool((task.triggered_test.inputs[..., -3:, -3:] == 1.0).all())
    again = poison_task(digits, rate=0.02, identified_fraction=0.5, target=0, seed=1)
    assert torch.equal(again.identified.ids, task.identified.ids)


def test_data_spec_modifiers():
    poisoned = unlearning.load_dataset("digits+poison:rate=0.02,identified=0.5,seed=1")
    assert poisoned.poison is not None and len(poisoned.poison.poisoned_ids) == round(0.02 * len(poisoned.train))
    assert poisoned.fingerprint != unlearning.load_dataset("digits").fingerprint
    forget = unlearning.parse_forget("poison:identified", poisoned)
    assert torch.equal(forget.ids, poisoned.poison.identified.ids) and forget.kind == "poison"
    assert len(unlearning.parse_forget("poison:all", poisoned).ids) == len(poisoned.poison.poisoned_ids)
    coarse = unlearning.load_dataset("digits+coarse:0,1,2,3,4/5,6,7,8,9")
    assert coarse.num_classes == 2 and len(unlearning.parse_forget("subclass:7", coarse).ids) > 0


@pytest.mark.parametrize(
    "spec,message",
    [
        ("digits+poison:rate=2", "poison rate"),
        ("digits+poison:speed=1", "unknown poison option 'speed'"),
        ("digits+poison:rate=x", "not a number"),
        ("digits+blur:3", "unknown modifier 'blur'"),
        ("digits+coarse:0,1/2,x", "coarse groups"),
        ("digits+coarse:0,1/2,3", "leave classes"),
    ],
)
def test_bad_data_spec_modifiers_are_refused(spec, message):
    with pytest.raises(unlearning.UserError, match=message):
        unlearning.load_dataset(spec)


def test_poison_forget_spec_needs_a_poisoned_data_set(digits):
    with pytest.raises(unlearning.UserError, match="no poison"):
        unlearning.parse_forget("poison:identified", digits)


def test_poison_trigger_is_stamped_after_augmentation_and_survives_subsets():
    generator = torch.Generator().manual_seed(0)
    n = 40
    images = torch.rand(n, 3, 16, 16, generator=generator) * 0.5  # the patch (channel max) stands out
    split = unlearning.data.Split(torch.arange(n), images, torch.arange(n) % 4)
    dataset = unlearning.data.Dataset("toy", split, split, 4, "image", list("abcd"), "toy")
    task = poison_task(dataset, rate=0.1, identified_fraction=0.5, target=0, seed=0)
    train = task.dataset.train
    normalize = task.dataset.normalization()
    rows = task.dataset.index_of(task.poisoned_ids)
    channel_max = images.amax(dim=(0, 2, 3))
    value = unlearning.data.normalize_batch(channel_max.view(1, 3, 1, 1), normalize).flatten()

    def flip(x):
        return x.flip(-1)  # moves a stored bottom-right patch to the bottom-left

    # Without augmentation the stored (already triggered) images come out unchanged.
    plain, _ = next(train.batches(n, normalize=normalize))
    assert torch.allclose(plain, unlearning.data.normalize_batch(train.inputs, normalize))
    batch, labels = next(train.batches(n, normalize=normalize, augment=flip))
    expected = flip(unlearning.data.normalize_batch(images, normalize))  # the clean pixels, augmented ...
    expected[rows] = unlearning.data.add_trigger(expected[rows], value)  # ... then stamped
    assert torch.allclose(batch, expected, atol=1e-6)
    clean_rows = torch.ones(n, dtype=torch.bool)
    clean_rows[rows] = False
    assert torch.allclose(batch[clean_rows], flip(plain[clean_rows]), atol=1e-6)
    assert bool((labels[rows] == 0).all())

    # A retain set that drops some poisoned rows, joined with relabelled rows (as amnesiac
    # does), still stamps exactly the poisoned rows it holds.
    keep = torch.arange(0, n, 2)
    retain = train.subset(keep)
    joined = retain.concat(train.subset(rows))
    out, _ = next(joined.batches(len(joined), normalize=normalize, augment=flip))
    poisoned_in_joined = torch.cat([torch.isin(keep, rows), torch.ones(len(rows), dtype=torch.bool)])
    assert torch.allclose(out[poisoned_in_joined][..., -3:, -3:], value.view(1, 3, 1, 1).expand(-1, -1, 3, 3))
    assert torch.allclose(out[~poisoned_in_joined], flip(plain[keep][~torch.isin(keep, rows)]), atol=1e-6)
