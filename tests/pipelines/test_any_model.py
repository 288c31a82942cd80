"""Any model in, end to end through the CLI: a user's own module in a file outside the project
(its classes reach Ray workers that cannot import it), and torchvision's ResNet-18 on 32-pixel
images through `train --arch`, `import`, `importance` and `forget`."""

from __future__ import annotations

import io
import json
import sys
import textwrap

import mlflow
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import unlearning
from pipelines.cli import main
from unlearning.models import logits_of
from unlearning.training import TrainConfig, train

pytestmark = pytest.mark.ray

USER_MODULE = '''
from torch import nn


class DigitsNet(nn.Module):
    """Returns a dict, as Hugging Face models do."""

    def __init__(self, num_classes: int, width: int = 8):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.Flatten())
        self.head = nn.Linear(width * 64, num_classes)

    def forward(self, x):
        return {"logits": self.head(self.features(x))}
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch, ray_session):
    """Importable here only: the path is added after Ray started, so its workers lack it."""
    folder = tmp_path / "elsewhere"
    folder.mkdir()
    (folder / "my_digits_net.py").write_text(textwrap.dedent(USER_MODULE))
    monkeypatch.syspath_prepend(str(folder))
    yield
    sys.modules.pop("my_digits_net", None)


def run(capsys, *argv) -> str:
    code = main(["--quiet", *map(str, argv)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out


def test_a_users_module_goes_through_train_importance_and_forget_on_ray(tmp_path, capsys, user_module):
    import ray

    @ray.remote
    def importable() -> bool:
        import importlib.util

        return importlib.util.find_spec("my_digits_net") is not None

    assert not ray.get(importable.remote())  # the workers cannot import it: the class travels by value
    out = run(capsys, "train", "--data", "digits", "--arch", "my_digits_net:DigitsNet", "--arch-arg", "width=6",
              "--epochs", "15", "--out", tmp_path / "ck")
    assert "trained my_digits_net:DigitsNet" in out
    run(capsys, "importance", "--model", tmp_path / "ck", "--data", "digits", "--out", tmp_path / "store",
        "--ray-min-rows", "0", "--workers", "2")
    assert json.loads((tmp_path / "store" / "importance.json").read_text())["workers"] == 2  # built on Ray
    out = run(capsys, "forget", "--model", tmp_path / "ck", "--data", "digits", "--forget", "class:2",
              "--importance", tmp_path / "store", "--out", tmp_path / "run")
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["original_metrics"]["test_forget_acc"] > 0.9
    assert report["metrics"]["test_forget_acc"] <= 0.05
    assert report["metrics"]["test_retain_acc"] >= report["original_metrics"]["test_retain_acc"] - 0.05
    root = json.loads((tmp_path / "ck" / "model.json").read_text())["fingerprint"]
    name = f"my_digits_net-DigitsNet-digits-{root[:8]}"  # ARCH-DATA-ROOT8
    assert report["mlflow"]["model_name"] == name and name in out

    served = mlflow.pytorch.load_model(f"models:/{name}@current")
    checkpoint = unlearning.load_model(tmp_path / "run").eval()
    inputs = torch.randn(6, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(served(inputs), logits_of(checkpoint(inputs)), atol=1e-5)


def rgb_digits_parquet(folder) -> None:
    """digits as 16x16 RGB PNGs (nearest upsampling, a colour per class): 200 train, 60 test rows."""
    from sklearn.datasets import load_digits

    data = load_digits()
    colours = np.random.default_rng(0).uniform(0.3, 1.0, (10, 3))
    folder.mkdir()
    for name, rows in (("train", range(200)), ("test", range(200, 260))):
        images = []
        for i in rows:
            grey = np.kron(data.images[i] / 16, np.ones((2, 2)))
            image = (grey[..., None] * colours[data.target[i]] * 255).astype(np.uint8)
            buffer = io.BytesIO()
            Image.fromarray(image).save(buffer, format="PNG")
            images.append(buffer.getvalue())
        table = pa.table({"id": pa.array(list(rows), pa.int64()), "label": pa.array(data.target[list(rows)], pa.int64()),
                          "image": pa.array(images, pa.binary())})
        pq.write_table(table, folder / f"{name}.parquet", row_group_size=100)


def test_torchvision_resnet18_through_train_import_importance_and_forget(tmp_path, capsys):
    data = tmp_path / "digits16"
    rgb_digits_parquet(data)
    out = run(capsys, "train", "--data", data, "--arch", "torchvision:resnet18", "--epochs", "1",
              "--out", tmp_path / "ck")
    assert "trained torchvision:resnet18" in out
    assert unlearning.load_model(tmp_path / "ck").conv1.kernel_size == (3, 3)  # the small-image stem

    # weights trained elsewhere (here: a few epochs in this process), saved as a torch state dict
    dataset = unlearning.load_dataset(data)
    normalize = dataset.normalization()
    trained = unlearning.new_model("torchvision:resnet18", 10, dataset.input_shape, normalize, seed=0)
    train(trained, dataset.train, TrainConfig(epochs=4, batch_size=20, lr=0.05), normalize)
    torch.save(trained.state_dict(), tmp_path / "weights.pt")
    out = run(capsys, "import", "--factory", "torchvision:resnet18", "--weights", tmp_path / "weights.pt",
              "--input-shape", "3,16,16", "--mean", ",".join(map(str, normalize["mean"])),
              "--std", ",".join(map(str, normalize["std"])), "--data", data, "--out", tmp_path / "imported")
    assert "10 classes" in out
    assert json.loads((tmp_path / "imported" / "model.json").read_text())["fingerprint"] == \
        unlearning.model_fingerprint(trained)

    run(capsys, "importance", "--model", tmp_path / "imported", "--data", data, "--out", tmp_path / "store")
    run(capsys, "forget", "--model", tmp_path / "imported", "--data", data, "--forget", "class:7",
        "--importance", tmp_path / "store", "--no-track", "--out", tmp_path / "run")
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["original_metrics"]["test_forget_acc"] > 0.5  # the network learnt the class
    assert report["metrics"]["test_forget_acc"] <= 0.05  # and forgot it
    assert report["metrics"]["test_retain_acc"] >= report["original_metrics"]["test_retain_acc"] - 0.1
    assert json.loads((tmp_path / "run" / "model.json").read_text())["arch"] == "torchvision:resnet18"


def test_forget_from_python_takes_a_ray_dataset_like_tensors(ray_session, digits, digits_model):
    import ray

    import pipelines

    def as_ray(split):
        return ray.data.from_items([{"id": int(i), "image": x.numpy(), "label": int(y)}
                                    for i, x, y in zip(split.ids, split.inputs, split.labels)])

    options = dict(forget="class:6", method="ssd", params={"alpha": 2, "lam": 0.5}, track=False, device="cpu")
    from_ray = pipelines.forget(digits_model, train=as_ray(digits.train), test=as_ray(digits.test), **options)
    from_tensors = pipelines.forget(digits_model, train=(digits.train.inputs, digits.train.labels, digits.train.ids),
                                    test=(digits.test.inputs, digits.test.labels), **options)
    assert from_ray.report.fingerprint == from_tensors.report.fingerprint
    assert from_ray.report.forget.size == int((digits.train.labels == 6).sum())
    assert from_ray.report.metrics["test_forget_acc"] < from_ray.report.original_metrics["test_forget_acc"]
