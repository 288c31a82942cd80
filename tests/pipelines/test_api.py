"""A whole request from Python: `pipelines.forget(...)` on tensors, DataLoaders, torch Datasets,
paths and checkpoints; the same rows in any form give the same model; bad input is one line."""

from __future__ import annotations

import mlflow
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import pipelines
import unlearning
from pipelines.options import ForgetOptions
from pipelines.request import run_forget
from tests.conftest import assert_state_equal, state_copy
from unlearning.checkpoint import model_meta
from unlearning.models import logits_of


@pytest.fixture(scope="module")
def rows(digits):
    """digits' training and test rows as plain tensors, as a user would hold them."""
    return (digits.train.inputs, digits.train.labels), (digits.test.inputs, digits.test.labels)


def test_forget_on_tensors_forgets_the_class_and_registers_an_mlflow_model(digits_model, rows):
    train, test = rows
    model, report = pipelines.forget(digits_model, train=train, forget="class:3", test=test, method="ptn",
                                     track=True, device="cpu")
    assert report.method == "ptn" and report.reached
    assert report.original_metrics["test_forget_acc"] > 0.9 and report.metrics["test_forget_acc"] <= 0.05
    assert report.metrics["test_retain_acc"] >= report.original_metrics["test_retain_acc"] - 0.02
    assert report.forget.size == int((train[1] == 3).sum())
    assert report.mlflow.model_name == f"small_cnn-data-{unlearning.model_fingerprint(digits_model)[:8]}"
    served = mlflow.pytorch.load_model(f"models:/{report.mlflow.model_name}@current")
    inputs = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(served(inputs), model.eval()(inputs), atol=1e-5)
    assert unlearning.model_fingerprint(model) == report.fingerprint


def test_the_same_rows_in_any_form_give_the_same_model(digits_model, rows):
    (inputs, labels), test = rows
    forget = torch.nonzero(labels == 5).flatten()  # ids default to row numbers
    options = dict(track=False, device="cpu", params={"alpha": 2, "lam": 0.5})
    as_tensors = pipelines.forget(digits_model, train=(inputs, labels), forget=forget, test=test,
                                  method="ssd", **options)
    as_loader = pipelines.forget(digits_model, train=DataLoader(TensorDataset(inputs, labels), batch_size=100),
                                 forget=forget.tolist(), test=DataLoader(TensorDataset(*test), batch_size=64),
                                 method="ssd", **options)
    as_dataset = pipelines.forget(digits_model, train=TensorDataset(inputs, labels), forget=forget,
                                  test=TensorDataset(*test), method="ssd", **options)
    kept = labels != 5
    as_retain = pipelines.forget(digits_model, retain=(inputs[kept], labels[kept], torch.nonzero(kept).flatten()),
                                 forget=(inputs[~kept], labels[~kept], forget), test=test, method="ssd",
                                 **options)
    reference = state_copy(as_tensors.model)
    for result in (as_loader, as_dataset, as_retain):
        assert_state_equal(result.model, reference)
        assert result.report.metrics["forget_acc"] == as_tensors.report.metrics["forget_acc"]
    assert as_tensors.report.metrics["forget_acc"] < as_tensors.report.original_metrics["forget_acc"]


def test_a_data_spec_and_a_checkpoint_give_what_the_cli_request_gives(digits_checkpoint, tmp_path):
    options = ForgetOptions(method="ssd", params={"alpha": 2, "lam": 0.5}, track=False, device="cpu", plots=False)
    cli = run_forget(str(digits_checkpoint), "digits", "class:1", str(tmp_path / "cli"), options)
    model, report = pipelines.forget(str(digits_checkpoint), train="digits", forget="class:1", method="ssd",
                                     params={"alpha": 2, "lam": 0.5}, track=False, device="cpu",
                                     out=tmp_path / "api")
    assert report.fingerprint == cli.fingerprint == unlearning.model_fingerprint(model)
    assert report.metrics == cli.metrics
    assert (tmp_path / "api" / "report.json").is_file() and (tmp_path / "api" / "report.md").is_file()


def test_a_module_built_elsewhere_needs_a_factory_only_to_be_saved(digits_model, rows):
    train, test = rows
    plain = torch.nn.Sequential(*digits_model)  # the same layers, no amnesis metadata
    plain.load_state_dict(digits_model.state_dict())
    assert not hasattr(plain, "amnesis_meta")
    model, report = pipelines.forget(plain, train=train, forget="class:4", test=test, method="ssd",
                                     params={"alpha": 2, "lam": 0.5}, track=False, device="cpu")
    assert report.metrics["forget_acc"] < report.original_metrics["forget_acc"]
    with pytest.raises(unlearning.UserError, match="names no factory"):
        pipelines.forget(plain, train=train, forget="class:4", test=test, method="ssd", track=True, device="cpu")


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(train="digits", retain=(torch.zeros(4, 1, 8, 8), torch.zeros(4))), "either train= .* or retain="),
    (dict(train=(torch.zeros(40, 1, 8, 8), torch.arange(40) % 10)), "need test= data too"),
    (dict(train=(torch.full((40, 1, 8, 8), float("nan")), torch.arange(40) % 10), test="x"), "NaN or infinite"),
    (dict(train=(torch.zeros(40, 1, 8, 8), torch.zeros(40) + 0.5), test="x"), "labels must be 40 integers"),
    (dict(train="digits", test=(torch.zeros(4, 1, 8, 8), torch.zeros(4))), "brings its own test split"),
    (dict(train="digits", forget=[0.5, 1.5]), "forget ids must be integers"),
    (dict(train="digits", forget=[10**9]), "not in the training data"),
    (dict(train="digits", colour="red"), "unknown options \\['colour'\\]"),
    (dict(train="digits", method="no_such_method"), "unknown method"),
    (dict(train=[1, 2, 3], test="x"), "forget ids|takes a data spec"),
])
def test_bad_input_is_one_line(digits_model, kwargs, message):
    kwargs = {"forget": "class:3", "track": False, "device": "cpu", **kwargs}
    if kwargs.get("test") == "x":
        kwargs["test"] = (torch.zeros(10, 1, 8, 8), torch.arange(10))
    with pytest.raises(unlearning.UserError, match=message):
        pipelines.forget(digits_model, **kwargs)


def test_the_model_keeps_its_metadata_and_the_input_model_is_untouched(digits_model, rows):
    before = state_copy(digits_model)
    train, test = rows
    model, _ = pipelines.forget(digits_model, train=train, forget="random:20", test=test, method="ssd",
                                track=False, device="cpu")
    assert_state_equal(digits_model, before)
    assert model_meta(model)["arch"] == "small_cnn"
    assert logits_of(model(torch.zeros(2, 1, 8, 8))).shape == (2, 10)
