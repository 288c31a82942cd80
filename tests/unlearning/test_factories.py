"""Any model in: checkpoints that name a factory, the papers' networks, weights trained
elsewhere, and models whose output is a dict or ModelOutput with `logits`."""

from __future__ import annotations

import json
import sys
import textwrap
from collections import OrderedDict

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import unlearning
from tests.conftest import assert_state_equal, method_params, state_copy
from unlearning.checkpoint import import_model, model_meta, read_state_dict
from unlearning.data import split_forget
from unlearning.importance import compute_importance_sums
from unlearning.models import arch_label, build_model, logits_of
from unlearning.training import TrainConfig

USER_MODULE = '''
"""A user's networks, in a file outside the project."""
from torch import nn


class TwoLayer(nn.Module):
    def __init__(self, num_classes: int, input_shape, hidden: int = 32):
        super().__init__()
        size = 1
        for d in input_shape:
            size *= d
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(size, hidden), nn.ReLU())
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x):
        return {"logits": self.head(self.body(x)), "hidden": self.body(x)}


def make_net(num_classes: int, hidden: int = 32) -> nn.Module:
    """A factory that fixes its own input size (8x8 digits)."""
    return TwoLayer(num_classes, (1, 8, 8), hidden)


class PlainTwoLayer(TwoLayer):
    def forward(self, x):
        return self.head(self.body(x))


def make_plain_net(num_classes: int, hidden: int = 32) -> nn.Module:
    """The same network returning the logits tensor."""
    return PlainTwoLayer(num_classes, (1, 8, 8), hidden)


def not_annotated(num_classes):
    return TwoLayer(num_classes, (1, 8, 8))
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """`usernets`, importable from a directory outside the project (as PYTHONPATH would make it)."""
    (tmp_path / "usernets_pkg").mkdir()
    (tmp_path / "usernets_pkg" / "usernets.py").write_text(textwrap.dedent(USER_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path / "usernets_pkg"))
    yield
    sys.modules.pop("usernets", None)


def test_torchvision_resnet18_gets_the_small_image_stem_for_32_pixels():
    small = build_model("torchvision:resnet18", 10, (3, 32, 32))
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1)
    assert isinstance(small.maxpool, nn.Identity)
    large = build_model("torchvision:resnet18", 10, (3, 224, 224))
    assert large.conv1.kernel_size == (7, 7) and isinstance(large.maxpool, nn.MaxPool2d)
    assert small(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    # the name checkpoints used before factories still loads as the same network
    assert build_model("resnet18", 10, (3, 32, 32)).state_dict().keys() == small.state_dict().keys()


def test_torchvision_vit_b_16_takes_image_and_patch_size():
    vit = build_model("torchvision:vit_b_16", 10, (3, 32, 32), patch_size=8)
    assert vit.image_size == 32 and vit.patch_size == 8
    assert vit(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    assert sum(p.numel() for p in vit.parameters()) > 80_000_000  # ViT-B, not a small variant
    with pytest.raises(unlearning.UserError, match="multiple of patch_size"):
        build_model("torchvision:vit_b_16", 10, (3, 30, 30))


def test_other_torchvision_and_timm_models_by_name():
    mobile = build_model("torchvision:mobilenet_v3_small", 7, (3, 32, 32))
    assert mobile(torch.zeros(2, 3, 32, 32)).shape == (2, 7)
    pytest.importorskip("timm")
    net = build_model("timm:resnet10t", 7, (1, 32, 32))  # in_chans from the input shape
    assert net(torch.zeros(2, 1, 32, 32)).shape == (2, 7)
    vit = build_model("timm:vit_tiny_patch16_224", 7, (3, 32, 32), img_size=32, patch_size=4)
    assert vit(torch.zeros(2, 3, 32, 32)).shape == (2, 7)


def test_a_user_factory_round_trips_through_a_checkpoint(tmp_path, user_module):
    model = unlearning.new_model("usernets:make_net", 10, (1, 8, 8), seed=0, hidden=16)
    assert model.head.out_features == 10 and model.body[1].out_features == 16  # num_classes passed, not input_shape
    unlearning.save_model(model, tmp_path / "ck")
    meta = json.loads((tmp_path / "ck" / "model.json").read_text())
    assert meta["arch"] == "usernets:make_net" and meta["arch_args"] == {"hidden": 16}
    loaded = unlearning.load_model(tmp_path / "ck")
    assert_state_equal(loaded, state_copy(model))
    x = torch.randn(4, 1, 8, 8)
    assert torch.equal(logits_of(loaded(x)), logits_of(model(x)))
    assert arch_label("usernets:make_net") == "usernets-make_net"


def test_save_model_of_a_module_built_elsewhere_names_its_factory(tmp_path, user_module):
    import usernets

    model = usernets.make_net(4, hidden=8)
    with pytest.raises(unlearning.UserError, match="does not say how to rebuild it"):
        unlearning.save_model(model, tmp_path / "no-factory")
    unlearning.save_model(model, tmp_path / "ck", factory="usernets:make_net", factory_kwargs={"hidden": 8},
                          input_shape=[1, 8, 8], normalize={"mean": [0.3], "std": [0.4]})
    meta = json.loads((tmp_path / "ck" / "model.json").read_text())
    assert meta["num_classes"] == 4  # read from the model's output
    assert meta["normalize"] == {"mean": [0.3], "std": [0.4]}
    assert_state_equal(unlearning.load_model(tmp_path / "ck"), state_copy(model))
    with pytest.raises(unlearning.UserError, match="builds a different network"):
        unlearning.save_model(usernets.make_net(4, hidden=8), tmp_path / "wrong", factory="usernets:make_net",
                              input_shape=[1, 8, 8])  # hidden defaults to 32 in the factory
    assert not (tmp_path / "wrong").exists()


@pytest.mark.parametrize(("arch", "arch_args", "message"), [
    ("shutil:rmtree", {"path": "/nonexistent"}, "must be a torch.nn.Module subclass"),
    ("usernets:not_annotated", {}, "must be a torch.nn.Module subclass"),
    ("no_such_module_xyz:make", {}, "cannot import no_such_module_xyz"),
    ("usernets:missing", {}, "has no 'missing'"),
    ("usernets:make_net", {"depth": 3}, "does not take arguments"),
    ("nonsense name", {}, "unknown architecture"),
])
def test_a_checkpoint_cannot_name_any_callable(tmp_path, user_module, arch, arch_args, message):
    """Loading imports a factory by name, never unpickles, and refuses what is not a model builder."""
    model = unlearning.new_model("usernets:make_net", 10, (1, 8, 8), seed=0)
    unlearning.save_model(model, tmp_path / "ck")
    meta_path = tmp_path / "ck" / "model.json"
    meta = json.loads(meta_path.read_text())
    meta.update(arch=arch, arch_args=arch_args)
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(unlearning.UserError, match=message):
        unlearning.load_model(tmp_path / "ck")


def test_weights_from_elsewhere_are_read_without_unpickling(tmp_path):
    reference = build_model("torchvision:resnet18", 10, (3, 32, 32))
    state = reference.state_dict()
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "ddp.pt")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "w.safetensors"))
    for path in (tmp_path / "ddp.pt", tmp_path / "w.safetensors"):
        model = import_model("torchvision:resnet18", {}, path, [3, 32, 32])
        assert model_meta(model)["num_classes"] == 10  # from the head's size in the weights
        assert_state_equal(model, state)

    class Payload:
        def __reduce__(self):
            return (print, ("unpickled!",))

    torch.save({"state_dict": state, "extra": Payload()}, tmp_path / "pickle.pt")
    with pytest.raises(unlearning.UserError, match="weights_only=True"):
        read_state_dict(tmp_path / "pickle.pt")
    with pytest.raises(unlearning.UserError, match="does not fit the network"):
        import_model("torchvision:resnet18", {}, tmp_path / "w.safetensors", [3, 32, 32], num_classes=5)


class DictOutput(nn.Module):
    """The same network, returning what Hugging Face models return: a mapping with logits."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return OrderedDict(logits=self.model(x), features=x.flatten(1))


def as_dict_model(model: nn.Module) -> nn.Module:
    wrapped = DictOutput(model)
    wrapped.amnesis_meta = dict(model_meta(model))
    return wrapped


@pytest.mark.parametrize("mode", ["batch", "per_sample"])
def test_importance_of_a_dict_output_model_equals_the_tensor_models(digits, digits_model, mode):
    batches = list(digits.train.subset(torch.arange(96)).batches(32, normalize=model_meta(digits_model)["normalize"]))
    plain = compute_importance_sums(digits_model, batches, mode=mode)
    wrapped = compute_importance_sums(as_dict_model(digits_model), batches, mode=mode)
    for name, total in plain.sums.items():
        assert torch.equal(wrapped.sums[f"model.{name}"], total), name


REBUILDING = ("retrain", "bad_teacher")  # they train a fresh network the factory builds


def dict_task(digits, model, spec="class:3"):
    forget = unlearning.parse_forget(spec, digits)
    retain_split, forget_split = split_forget(digits, forget)
    return unlearning.UnlearningTask(model, digits, forget, retain_split, forget_split,
                                     model_meta(model)["normalize"], importance_mode="batch",
                                     train_config=TrainConfig(epochs=2, lr=0.05))


@pytest.mark.parametrize("method", sorted(set(unlearning.METHODS) - set(REBUILDING)))
def test_every_method_takes_a_model_whose_output_is_a_dict(digits, digits_model, method, request):
    """Every loss and metric reads logits_of(output): the same weights give the same model."""
    params = {"epochs": 1} if method == "finetune" else method_params(method, request)
    plain = unlearning.run_method(method, dict_task(digits, digits_model), **params).model
    wrapped = unlearning.run_method(method, dict_task(digits, as_dict_model(digits_model)), **params).model
    assert_state_equal(plain, {k.removeprefix("model."): v for k, v in wrapped.state_dict().items()})


@pytest.mark.parametrize("method", REBUILDING)
def test_methods_that_rebuild_the_network_train_a_dict_output_factory_model(digits, user_module, method):
    """The same factory network returning a dict or a tensor: the same weights, before and after."""
    from unlearning.training import train

    normalize = digits.normalization()
    models = []
    for factory in ("usernets:make_net", "usernets:make_plain_net"):
        model = unlearning.new_model(factory, 10, digits.input_shape, normalize, seed=0)
        train(model, digits.train, TrainConfig(epochs=2, lr=0.05), normalize)
        models.append(unlearning.run_method(method, dict_task(digits, model), epochs=1).model)
    assert isinstance(models[0](torch.zeros(1, 1, 8, 8)), dict)
    assert_state_equal(models[0], state_copy(models[1]))
