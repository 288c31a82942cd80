"""Training recipes: resuming after a kill gives the same weights, bf16 autocast and
channels-last train to a working model, and old recipes keep their fingerprints."""

from __future__ import annotations

import pytest
import torch

import unlearning
from unlearning.data.containers import Split
from unlearning.training import DEFAULT_RECIPES, TrainConfig, train

from ..conftest import assert_state_equal, state_copy


class Killed(Exception):
    pass


def small_images(n: int = 96, seed: int = 0) -> Split:
    """16-pixel RGB images whose class is the brightest channel: learnable, and big enough
    for the random-crop augmentation (whose generator the resume must restore)."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (n,), generator=generator)
    inputs = torch.rand(n, 3, 16, 16, generator=generator) * 0.5
    inputs[torch.arange(n), labels] += 0.5
    return Split(torch.arange(n), inputs, labels)


def fresh_model():
    return unlearning.new_model("small_cnn", 3, (3, 16, 16), None, seed=0)


def test_a_killed_run_resumes_to_the_same_weights(tmp_path):
    split = small_images()
    config = TrainConfig(epochs=3, batch_size=16, lr=0.05, augment=True, seed=4)
    straight = train(fresh_model(), split, config)

    resume = tmp_path / "state.pt"
    seen = {"rows": 0}

    def kill_in_the_second_epoch(n, _loss):
        seen["rows"] += n
        if seen["rows"] > 1.5 * len(split):
            raise Killed

    with pytest.raises(Killed):
        train(fresh_model(), split, config, on_step=kill_in_the_second_epoch, resume=resume)
    assert torch.load(resume, weights_only=True)["epochs_done"] == 1
    steps = []
    resumed = train(fresh_model(), split, config, on_step=lambda n, _: steps.append(n), resume=resume)
    assert sum(steps) == 2 * len(split)  # only epochs 2 and 3 ran again
    assert_state_equal(resumed, state_copy(straight))
    assert not resume.exists()


def test_bf16_channels_last_training_learns_and_saves(tmp_path):
    split = small_images(192)
    config = TrainConfig(epochs=4, batch_size=16, lr=0.05, precision="bf16", channels_last=True,
                         label_smoothing=0.1)
    model = train(fresh_model(), split, config)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast leaves weights fp32
    with torch.no_grad():
        accuracy = (model(split.inputs).argmax(1) == split.labels).float().mean().item()
    assert accuracy > 0.9  # the brightest channel is an easy rule
    unlearning.save_model(model, tmp_path / "ckpt")  # contiguous again: safetensors accepts it
    assert unlearning.load_model(tmp_path / "ckpt")(split.inputs[:4]).shape == (4, 3)


def test_recipes_without_the_new_fields_keep_their_json():
    assert set(TrainConfig().to_dict()) == {
        "epochs", "batch_size", "lr", "momentum", "weight_decay", "optimizer", "schedule", "augment", "seed",
    }
    assert DEFAULT_RECIPES["torchvision:resnet18"].to_dict()["label_smoothing"] == 0.1
    assert TrainConfig(**TrainConfig(precision="bf16").to_dict()).precision == "bf16"


@pytest.mark.parametrize("bad, message", [
    ({"precision": "fp8"}, "precision must be one of fp32, bf16"),
    ({"label_smoothing": 1.0}, "label_smoothing must be in"),
])
def test_bad_recipes_are_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**bad)
