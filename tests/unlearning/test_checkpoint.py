"""Checkpoints: safetensors + JSON, fingerprints, and every way a file can be wrong."""

from __future__ import annotations

import json

import pytest
import torch

import unlearning
from tests.conftest import assert_state_equal
from unlearning.checkpoint import MODEL_META, MODEL_WEIGHTS


def test_round_trip_is_exact(digits_model, tmp_path):
    fingerprint = unlearning.save_model(digits_model, tmp_path / "m")
    loaded = unlearning.load_model(tmp_path / "m")
    assert_state_equal(loaded, digits_model.state_dict())
    assert unlearning.model_fingerprint(loaded) == fingerprint
    meta = json.loads((tmp_path / "m" / MODEL_META).read_text())
    assert meta["arch"] == "small_cnn" and meta["input_shape"] == [1, 8, 8]
    assert len(meta["normalize"]["mean"]) == 1 and meta["fingerprint"] == fingerprint


def test_existing_output_is_never_overwritten(digits_model, tmp_path):
    unlearning.save_model(digits_model, tmp_path / "m")
    before = (tmp_path / "m" / MODEL_WEIGHTS).read_bytes()
    with pytest.raises(unlearning.UserError, match="already exists"):
        unlearning.save_model(digits_model, tmp_path / "m")
    assert (tmp_path / "m" / MODEL_WEIGHTS).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no partial directory left


def test_truncated_weights_are_refused(digits_model, tmp_path):
    unlearning.save_model(digits_model, tmp_path / "m")
    weights = tmp_path / "m" / MODEL_WEIGHTS
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(unlearning.UserError, match="corrupt or truncated"):
        unlearning.load_model(tmp_path / "m")


def test_flipped_weight_bytes_fail_the_fingerprint(digits_model, tmp_path):
    unlearning.save_model(digits_model, tmp_path / "m")
    weights = tmp_path / "m" / MODEL_WEIGHTS
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(unlearning.UserError, match="fingerprint"):
        unlearning.load_model(tmp_path / "m")


def test_checkpoint_for_another_architecture_is_refused(digits_model, tmp_path):
    unlearning.save_model(digits_model, tmp_path / "m")
    meta_path = tmp_path / "m" / MODEL_META
    meta = json.loads(meta_path.read_text())
    meta["arch"] = "mlp"
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(unlearning.UserError, match="does not match architecture 'mlp'"):
        unlearning.load_model(tmp_path / "m")


def test_corrupt_json_and_missing_files_are_refused(digits_model, tmp_path):
    unlearning.save_model(digits_model, tmp_path / "m")
    (tmp_path / "m" / MODEL_META).write_text("{not json")
    with pytest.raises(unlearning.UserError, match="corrupt"):
        unlearning.load_model(tmp_path / "m")
    with pytest.raises(unlearning.UserError, match="does not exist"):
        unlearning.load_model(tmp_path / "nothing")


def test_non_finite_weights_are_refused(digits_model, tmp_path):
    broken = unlearning.new_model("small_cnn", 10, (1, 8, 8), seed=0)
    with torch.no_grad():
        broken[0].weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(unlearning.UserError, match="non-finite"):
        unlearning.save_model(broken, tmp_path / "nan")
    assert not (tmp_path / "nan").exists()
    # a hand-made file with a NaN (and a matching fingerprint) is refused on load
    from safetensors.torch import save_file

    unlearning.save_model(digits_model, tmp_path / "m")
    state = {k: v.clone() for k, v in digits_model.state_dict().items()}
    first = next(iter(state))
    state[first].view(-1)[0] = float("inf")
    save_file(state, str(tmp_path / "m" / MODEL_WEIGHTS))
    meta = json.loads((tmp_path / "m" / MODEL_META).read_text())
    meta["fingerprint"] = unlearning.checkpoint.fingerprint(state)
    (tmp_path / "m" / MODEL_META).write_text(json.dumps(meta))
    with pytest.raises(unlearning.UserError, match="non-finite"):
        unlearning.load_model(tmp_path / "m")


def test_importance_store_round_trip_and_refusal(digits, digits_model, tmp_path):
    sums = unlearning.compute_importance_sums(
        digits_model, digits.train.subset(torch.arange(64)).batches(32, normalize=digits.normalization())
    )
    meta = unlearning.save_importance(sums, tmp_path / "store", unlearning.model_fingerprint(digits_model), digits.fingerprint)
    assert meta["kind"] == "fisher" and meta["count"] == 2 and meta["num_samples"] == 64
    importance, loaded_meta = unlearning.load_importance(tmp_path / "store", digits_model)
    for name, value in sums.mean().items():
        assert torch.equal(importance[name], value)
    other = unlearning.new_model("small_cnn", 10, (1, 8, 8), seed=5)
    with pytest.raises(unlearning.UserError, match="computed for model"):
        unlearning.load_importance(tmp_path / "store", other)


def test_models_with_batchnorm_round_trip(tmp_path):
    """BatchNorm's num_batches_tracked is a 0-d int64 tensor: fingerprints must handle it."""
    model = unlearning.new_model("resnet_small", 10, (3, 32, 32), seed=0, width=4)
    fingerprint = unlearning.save_model(model, tmp_path / "resnet")
    loaded = unlearning.load_model(tmp_path / "resnet")
    assert unlearning.model_fingerprint(loaded) == fingerprint
    assert_state_equal(loaded, model.state_dict())
