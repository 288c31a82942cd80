"""Bad and hostile inputs against the command line, table-driven (issue #15).

Every case runs `unlearn ...` in this process against one workspace (a trained model, its
importance store, data files, an MLflow store with a registered lineage, a ledger) and asserts:
the exit status, a single-line message naming the problem without a traceback, and that the
workspace is byte-for-byte what it was: no output directory, no MLflow run or version, no
ledger change, every input unchanged.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from pipelines.cli import main

LONG = "x" * 300


@dataclass
class Workspace:
    root: Path
    model: Path  # small_cnn on digits
    store: Path  # its importance store (batch mode)
    features: Path  # a Parquet file of 16 float features, 3 classes
    features_model: Path  # an mlp trained on it
    other_model: Path  # another small_cnn on digits (seed 1): an unrelated lineage
    tracking: str  # the MLflow store, holding the digits model's lineage
    registered: str  # the lineage's registered model name

    def __truediv__(self, name: str) -> Path:
        return self.root / name


def write_parquet(path: Path, columns: dict, schema: pa.Schema | None = None, row_group_size: int | None = None) -> Path:
    pq.write_table(pa.table(columns, schema=schema), path, row_group_size=row_group_size)
    return path


def png(value: int, size: int = 8) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((size, size), value, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def features_columns(n: int = 240, seed: int = 0) -> dict:
    generator = np.random.default_rng(seed)
    labels = np.arange(n) % 3
    centres = generator.normal(size=(3, 16)) * 3
    features = centres[labels] + generator.normal(size=(n, 16))
    return {"id": np.arange(n, dtype=np.int64), "label": labels.astype(np.int64),
            "features": [row.astype(np.float32).tolist() for row in features]}


def cli(*argv) -> int:
    return main(["--quiet", *map(str, argv)])


def snapshot(root: Path) -> dict[str, str]:
    """Every path under `root` with a digest of its bytes (directories as '<dir>')."""
    state = {}
    for path in sorted(root.rglob("*")):
        relative = str(path.relative_to(root))
        state[relative] = "<dir>" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return state


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, digits_checkpoint) -> Workspace:
    root = tmp_path_factory.mktemp("hostile")
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
    cwd = os.getcwd()
    os.chdir(root)
    try:
        model = root / "model"
        shutil.copytree(digits_checkpoint, model)
        assert cli("importance", "--model", model, "--data", "digits", "--mode", "batch", "--out", root / "store") == 0
        features = write_parquet(root / "features.parquet", features_columns())
        assert cli("train", "--data", features, "--arch", "mlp", "--epochs", "3", "--out", root / "features-model") == 0
        # a registered lineage: version 1 the original, version 2 one request
        assert cli("forget", "--model", model, "--data", "digits", "--forget", "class:2", "--importance",
                   root / "store", "--mode", "batch", "--out", root / "runs" / "first") == 0
        assert cli("requests", "add", "--ids", "5,6", "--ledger", f"sqlite:///{root / 'requests.db'}") == 0
        assert cli("train", "--data", "digits", "--epochs", "2", "--seed", "1", "--out", root / "other-model") == 0
        report = json.loads((root / "runs" / "first" / "report.json").read_text())
        yield Workspace(root, model, root / "store", features, root / "features-model", root / "other-model",
                        os.environ["MLFLOW_TRACKING_URI"], report["mlflow"]["model_name"])
    finally:
        os.chdir(cwd)
        if previous is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = previous


# ---------------------------------------------------------------- bad files, made on demand


def empty_parquet(ws: Workspace) -> Path:
    schema = pa.schema([("id", pa.int64()), ("label", pa.int64()), ("features", pa.list_(pa.float32()))])
    return write_parquet(ws / "empty.parquet", {"id": [], "label": [], "features": []}, schema)


def variant(ws: Workspace, name: str, **changes) -> Path:
    columns = features_columns()
    columns.update(changes)
    return write_parquet(ws / name, columns)


def nan_features(ws: Workspace, value: float = float("nan"), name: str = "nan.parquet") -> Path:
    columns = features_columns()
    columns["features"][7][3] = value
    return write_parquet(ws / name, columns)


def ragged(ws: Workspace) -> Path:
    columns = features_columns()
    columns["features"][5] = columns["features"][5][:9]
    return write_parquet(ws / "ragged.parquet", columns)


def huge_ids(ws: Workspace) -> Path:
    columns = features_columns()
    ids = pa.array(np.arange(240, dtype=np.uint64) + np.uint64(2**63), type=pa.uint64())
    return write_parquet(ws / "uint64.parquet", {**columns, "id": ids})


def huge_label(ws: Workspace) -> Path:
    columns = features_columns()
    columns["label"] = columns["label"].copy()
    columns["label"][3] = 2**40
    return write_parquet(ws / "huge-label.parquet", columns)


def one_class_folder(ws: Workspace) -> Path:
    root = ws / "one-class"
    (root / "cat").mkdir(parents=True, exist_ok=True)
    for i in range(12):
        (root / "cat" / f"{i}.png").write_bytes(png(10 * i))
    return root


def corrupt_image_folder(ws: Workspace) -> Path:
    root = ws / "corrupt-images"
    for label in ("a", "b"):
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(6):
            (root / label / f"{i}.png").write_bytes(png(40 * i))
    (root / "b" / "3.png").write_bytes(b"not a png at all")
    return root


def bad_image_parquet(ws: Workspace) -> Path:
    images = [png(i) for i in range(40)]
    images[11] = b"\x89PNG broken"
    return write_parquet(ws / "bad-images.parquet",
                         {"id": np.arange(40), "label": np.arange(40) % 2, "image": images})


def ids_file(ws: Workspace, name: str, content: bytes) -> Path:
    path = ws / name
    path.write_bytes(content)
    return path


def checkpoint_variant(ws: Workspace, name: str, meta_text: str | None = None, edit=None,
                       weights: dict | None = None, drop_weights: bool = False) -> Path:
    """A copy of the digits model with its model.json replaced or edited, or its weights changed."""
    path = ws / name
    if path.exists():
        shutil.rmtree(path)
    shutil.copytree(ws.model, path)
    meta = json.loads((path / "model.json").read_text())
    if edit is not None:
        edit(meta)
        meta_text = json.dumps(meta)
    if meta_text is not None:
        (path / "model.json").write_text(meta_text)
    if weights is not None:
        save_file(weights, str(path / "model.safetensors"))
    if drop_weights:
        (path / "model.safetensors").unlink()
    return path


def wrong_shape_weights(ws: Workspace) -> Path:
    state = load_file(str(ws.model / "model.safetensors"))
    name = next(iter(state))
    state[name] = torch.zeros(3, 3)
    return checkpoint_variant(ws, "wrong-shape-model", weights=state, edit=lambda m: m.pop("fingerprint", None))


def store_variant(ws: Workspace, name: str, edit_meta=None, edit_tensors=None) -> Path:
    path = ws / name
    if path.exists():
        shutil.rmtree(path)
    shutil.copytree(ws.store, path)
    if edit_meta is not None:
        meta = json.loads((path / "importance.json").read_text())
        edit_meta(meta)
        (path / "importance.json").write_text(json.dumps(meta))
    if edit_tensors is not None:
        tensors = load_file(str(path / "importance.safetensors"))
        edit_tensors(tensors)
        save_file(tensors, str(path / "importance.safetensors"))
    return path


def drop_first(tensors: dict) -> None:
    tensors.pop(next(iter(tensors)))


def reshape_first(tensors: dict) -> None:
    name = next(iter(tensors))
    tensors[name] = torch.ones(7)


def nan_first(tensors: dict) -> None:
    name = next(iter(tensors))
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] = float("nan")


def pickle_weights(ws: Workspace) -> Path:
    import pickle

    path = ws / "weights.pt"
    path.write_bytes(pickle.dumps({"fc.weight": os.system}))
    return path


def search_yaml(ws: Workspace, text: str) -> Path:
    path = ws / "search.yaml"
    path.write_text(text)
    return path


# ---------------------------------------------------------------- the table

def forget(ws: Workspace, *extra, model=None, data="digits", spec="class:1"):
    return ["forget", "--model", model or ws.model, "--data", data, "--forget", spec, "--no-track",
            "--out", ws / "out", *extra]


def tracked(ws: Workspace, *extra, spec="class:1"):
    return ["forget", "--model", ws.model, "--data", "digits", "--forget", spec, "--importance", ws.store,
            "--mode", "batch", "--out", ws / "out", *extra]


def ledger(ws: Workspace) -> str:
    return f"sqlite:///{ws / 'requests.db'}"


CASES = {
    # ---- data sets
    "empty Parquet": (lambda ws: ["train", "--data", empty_parquet(ws), "--out", ws / "out"], "empty"),
    "string labels": (lambda ws: ["train", "--data", variant(ws, "str-labels.parquet",
                                                           label=[str(i % 3) for i in range(240)]),
                                  "--out", ws / "out"], "'label' column"),
    "float labels": (lambda ws: ["train", "--data", variant(ws, "float-labels.parquet",
                                                          label=np.arange(240) % 3 + 0.5),
                                 "--out", ws / "out"], "'label' column"),
    "null labels": (lambda ws: ["train", "--data", variant(ws, "null-labels.parquet",
                                                         label=pa.array([None] + [1] * 239, pa.int64())),
                                "--out", ws / "out"], "'label' column"),
    "string ids": (lambda ws: ["train", "--data", variant(ws, "str-ids.parquet", id=[f"r{i}" for i in range(240)]),
                               "--out", ws / "out"], "'id' column"),
    "ids beyond int64": (lambda ws: ["train", "--data", huge_ids(ws), "--out", ws / "out"], "'id' column"),
    "label of 2^40": (lambda ws: ["train", "--data", huge_label(ws), "--out", ws / "out"], "label"),
    "negative label": (lambda ws: ["train", "--data", variant(ws, "neg-label.parquet", label=np.arange(240) % 3 - 1),
                                   "--out", ws / "out"], "non-negative"),
    "duplicate ids": (lambda ws: ["train", "--data", variant(ws, "dup-ids.parquet", id=np.arange(240) // 2),
                                  "--out", ws / "out"], "duplicates"),
    "ragged features": (lambda ws: ["train", "--data", ragged(ws), "--out", ws / "out"], "features"),
    "string features": (lambda ws: ["train", "--data", variant(ws, "str-features.parquet",
                                                             features=[["a", "b"]] * 240),
                                    "--out", ws / "out"], "features"),
    "NaN features in a request": (lambda ws: forget(ws, model=ws.features_model, data=nan_features(ws)),
                                  "not finite"),
    "inf features in a request": (lambda ws: forget(ws, model=ws.features_model,
                                                    data=nan_features(ws, float("inf"), "inf.parquet")),
                                  "not finite"),
    "NaN features in training": (lambda ws: ["train", "--data", nan_features(ws), "--out", ws / "out"], "not finite"),
    "one-class image folder": (lambda ws: ["train", "--data", one_class_folder(ws), "--out", ws / "out"], "class"),
    "undecodable image file": (lambda ws: ["train", "--data", corrupt_image_folder(ws), "--out", ws / "out"],
                               "cannot be decoded"),
    "undecodable image bytes": (lambda ws: ["train", "--data", bad_image_parquet(ws), "--out", ws / "out"],
                                "cannot be decoded"),
    "no label column": (lambda ws: ["train", "--data", write_parquet(ws / "no-label.parquet",
                                                                   {"id": [1, 2], "features": [[1.0], [2.0]]}),
                                    "--out", ws / "out"], "no 'label' column"),
    "not Parquet": (lambda ws: ["train", "--data", ids_file(ws, "text.parquet", b"hello"), "--out", ws / "out"],
                    "not a readable Parquet"),
    "missing data path": (lambda ws: ["train", "--data", ws / "nowhere", "--out", ws / "out"], "neither"),
    "unknown data modifier": (lambda ws: forget(ws, data="digits+bogus:1"), "bogus"),
    "model for other data": (lambda ws: forget(ws, data=ws.features), "expects 10 classes"),
    # ---- forget sets and id files
    "class out of range": (lambda ws: forget(ws, spec="class:12"), "out of range"),
    "class not a number": (lambda ws: forget(ws, spec="class:cat"), "class:cat"),
    "random:0": (lambda ws: forget(ws, spec="random:0"), "N must be between"),
    "random beyond the data": (lambda ws: forget(ws, spec="random:99999"), "N must be between"),
    "unknown forget kind": (lambda ws: forget(ws, spec="bogus:3"), "bogus:3"),
    "subclass of a flat data set": (lambda ws: forget(ws, spec="subclass:3"), "subclass"),
    "identified poison of a clean data set": (lambda ws: forget(ws, spec="poison:identified"), "has no poison"),
    "poison list that is no file": (lambda ws: forget(ws, "--method", "potion", spec="poison:nowhere.txt"),
                                    "'nowhere.txt' is not an id file"),
    "random:N of every training row": (lambda ws: forget(ws, spec="random:1438"), "N must be between"),
    "ids of every training row": (lambda ws: forget(ws, spec=every_train_id(ws)), "whole training set"),
    "non-UTF-8 ids file": (lambda ws: forget(ws, spec=ids_file(ws, "latin.txt", b"12\n\xe9\xff\n")), "UTF-8"),
    "words in ids file": (lambda ws: forget(ws, spec=ids_file(ws, "words.txt", b"12\nseven\n")),
                          "not an integer id"),
    "empty ids file": (lambda ws: forget(ws, spec=ids_file(ws, "empty.txt", b"\n# none\n")), "empty"),
    "id beyond int64": (lambda ws: forget(ws, spec=ids_file(ws, "big.txt", b"12\n99999999999999999999\n")),
                        "99999999999999999999"),
    "ids not in the data": (lambda ws: forget(ws, spec=ids_file(ws, "absent.txt", b"12\n50000\n")), "50000"),
    "ids Parquet without id": (lambda ws: forget(ws, spec=write_parquet(ws / "no-id.parquet", {"row": [1, 2]})),
                               "'id' column"),
    "requests add non-UTF-8 file": (lambda ws: ["requests", "add", "--file", ids_file(ws, "latin2.txt", b"\xe9\n"),
                                                "--ledger", ledger(ws)], "UTF-8"),
    "requests add word id": (lambda ws: ["requests", "add", "--ids", "1,x", "--ledger", ledger(ws)], "'x'"),
    "requests add no ids": (lambda ws: ["requests", "add", "--ids", " ", "--ledger", ledger(ws)], "needs ids"),
    "requests add id beyond int64": (lambda ws: ["requests", "add", "--ids", "99999999999999999999",
                                                 "--ledger", ledger(ws)], "99999999999999999999"),
    "requests add negative id": (lambda ws: ["requests", "add", "--ids", "-4", "--ledger", ledger(ws)], "-4"),
    # ---- checkpoints
    "model.json input_shape not a list": (lambda ws: forget(ws, model=checkpoint_variant(
        ws, "m1", edit=lambda m: m.update(input_shape=8))), "input_shape"),
    "model.json unknown arch_args": (lambda ws: forget(ws, model=checkpoint_variant(
        ws, "m2", edit=lambda m: m.update(arch_args={"wings": 2}))), "wings"),
    "model.json not an object": (lambda ws: forget(ws, model=checkpoint_variant(ws, "m3", meta_text="[1, 2]")),
                                 "model.json"),
    "model.json not JSON": (lambda ws: forget(ws, model=checkpoint_variant(ws, "m4", meta_text="{arch: ")),
                            "model.json"),
    "model.json num_classes a string": (lambda ws: forget(ws, model=checkpoint_variant(
        ws, "m5", edit=lambda m: m.update(num_classes="ten"))), "num_classes"),
    "model.json unknown factory": (lambda ws: forget(ws, model=checkpoint_variant(
        ws, "m6", edit=lambda m: m.update(arch="nosuchnet"))), "nosuchnet"),
    "model.json hostile factory": (lambda ws: forget(ws, model=checkpoint_variant(
        ws, "m7", edit=lambda m: m.update(arch="shutil:rmtree"))), "shutil:rmtree"),
    "weights missing": (lambda ws: forget(ws, model=checkpoint_variant(ws, "m8", drop_weights=True)),
                        "model.safetensors"),
    "weights truncated": (lambda ws: forget(ws, model=truncated_weights(ws)), "model.safetensors"),
    "weights of another shape": (lambda ws: forget(ws, model=wrong_shape_weights(ws)), "does not match"),
    "weights edited": (lambda ws: forget(ws, model=checkpoint_variant(
        ws, "m9", weights={k: v + 1 for k, v in load_file(str(ws.model / "model.safetensors")).items()})),
        "fingerprint"),
    "model path missing": (lambda ws: forget(ws, model=ws / "no-model"), "does not exist"),
    "import a pickle": (lambda ws: ["import", "--factory", "mlp", "--weights", pickle_weights(ws),
                                    "--input-shape", "16", "--out", ws / "out"], "weights_only"),
    "import zero input shape": (lambda ws: ["import", "--factory", "mlp", "--weights", ws.model / "model.safetensors",
                                            "--input-shape", "0,8,8", "--out", ws / "out"], "input-shape"),
    "import mean of wrong length": (lambda ws: ["import", "--factory", "small_cnn", "--weights",
                                                ws.model / "model.safetensors", "--input-shape", "1,8,8",
                                                "--mean", "0.1,0.2,0.3", "--std", "1,1,1", "--out", ws / "out"],
                                    "--mean"),
    "import zero std": (lambda ws: ["import", "--factory", "small_cnn", "--weights", ws.model / "model.safetensors",
                                    "--input-shape", "1,8,8", "--mean", "0.1", "--std", "0", "--out", ws / "out"],
                        "--std"),
    # ---- importance stores
    "store without model fingerprint": (lambda ws: forget(ws, "--importance", store_variant(
        ws, "s1", edit_meta=lambda m: m.pop("model_fingerprint"))), "model_fingerprint"),
    "store missing a tensor": (lambda ws: forget(ws, "--importance", store_variant(
        ws, "s2", edit_tensors=drop_first)), "importance store"),
    "store tensor of another shape": (lambda ws: forget(ws, "--importance", store_variant(
        ws, "s3", edit_tensors=reshape_first)), "importance store"),
    "store with NaN": (lambda ws: forget(ws, "--importance", store_variant(ws, "s4", edit_tensors=nan_first)),
                       "finite"),
    "store meta not JSON": (lambda ws: forget(ws, "--importance", store_meta_text(ws, "s5", "{")), "importance.json"),
    "store of another model": (lambda ws: forget(ws, "--importance", ws.store, model=ws.features_model,
                                                 data=ws.features), "importance store"),
    "store path missing": (lambda ws: forget(ws, "--importance", ws / "no-store"), "does not exist"),
    # ---- options
    "rho NaN": (lambda ws: forget(ws, "--rho", "nan"), "--rho"),
    "rho negative": (lambda ws: forget(ws, "--rho", "-1"), "--rho"),
    "rho above 1": (lambda ws: forget(ws, "--rho", "1.5"), "--rho"),
    "max_steps negative": (lambda ws: forget(ws, "--param", "max_steps=-1"), "max_steps"),
    "growth NaN": (lambda ws: forget(ws, "--param", "growth=nan"), "growth"),
    "growth below 1": (lambda ws: forget(ws, "--param", "growth=0.5"), "growth"),
    "start_divisor zero": (lambda ws: forget(ws, "--param", "start_divisor=0"), "start_divisor"),
    "walk_back not a boolean": (lambda ws: forget(ws, "--param", "walk_back=yes"), "walk_back must be true or false"),
    "settle_early not a boolean": (lambda ws: forget(ws, "--param", "settle_early=2"),
                                   "settle_early must be true or false"),
    "jit trust zero": (lambda ws: forget(ws, "--method", "jit", "--param", "trust=0"), "trust"),
    "refine on ptn_paper": (lambda ws: forget(ws, "--method", "ptn_paper", "--param", "refine=true"), "refine"),
    "unknown parameter": (lambda ws: forget(ws, "--param", "wings=2"), "wings"),
    "parameter of the wrong type": (lambda ws: forget(ws, "--param", "max_steps=many"), "max_steps"),
    "alpha NaN": (lambda ws: forget(ws, "--method", "ssd", "--alpha", "nan"), "alpha"),
    "lambda inf": (lambda ws: forget(ws, "--method", "ssd", "--lambda", "inf"), "lambda"),
    "unknown method": (lambda ws: forget(ws, "--method", "nope"), "unknown method 'nope'"),
    "batch size 0": (lambda ws: forget(ws, "--batch-size", "0"), "--batch-size"),
    "batch size negative": (lambda ws: forget(ws, "--batch-size", "-3"), "--batch-size"),
    "workers 0": (lambda ws: forget(ws, "--workers", "0"), "--workers"),
    "workers beyond the machine": (lambda ws: ["importance", "--model", ws.model, "--data", "digits",
                                               "--workers", "1000", "--ray-min-rows", "0", "--out", ws / "out"],
                                   "--workers 1000"),
    "ray-min-rows negative": (lambda ws: forget(ws, "--ray-min-rows", "-5"), "--ray-min-rows"),
    "device unknown": (lambda ws: forget(ws, "--device", "abacus"), "--device"),
    "device cuda without CUDA": (lambda ws: forget(ws, "--device", "cuda"), "CUDA"),
    "mode unknown": (lambda ws: forget(ws, "--mode", "bogus"), "--mode"),
    "option misspelt": (lambda ws: forget(ws, "--methd", "ssd"), "--methd"),
    "search config missing": (lambda ws: forget(ws, "--search", ws / "no.yaml"), "no.yaml"),
    "search config malformed": (lambda ws: forget(ws, "--search", search_yaml(ws, "search: [ptn\n")), "search.yaml"),
    "search config unknown key": (lambda ws: forget(ws, "--search", search_yaml(ws, "search: ptn\nwings: 2\n")),
                                  "wings"),
    "train zero epochs": (lambda ws: ["train", "--data", "digits", "--epochs", "0", "--out", ws / "out"], "--epochs"),
    "train negative lr": (lambda ws: ["train", "--data", "digits", "--lr", "-1", "--out", ws / "out"], "--lr"),
    "train NaN lr": (lambda ws: ["train", "--data", "digits", "--lr", "nan", "--out", ws / "out"], "--lr"),
    "train unknown arch": (lambda ws: ["train", "--data", "digits", "--arch", "nosuchnet", "--out", ws / "out"],
                           "nosuchnet"),
    "train bad arch arg": (lambda ws: ["train", "--data", "digits", "--arch", "mlp", "--arch-arg", "wings=2",
                                       "--out", ws / "out"], "wings"),
    # ---- output paths
    "out exists": (lambda ws: forget(ws)[:-1] + [ws.model], "already exists"),
    "out under /proc": (lambda ws: forget(ws)[:-1] + ["/proc/amnesis-run"], "/proc/amnesis-run"),
    "out name too long": (lambda ws: forget(ws)[:-1] + [ws / LONG], "too long"),
    "out in a file": (lambda ws: forget(ws)[:-1] + [ws.model / "model.json" / "run"], "model.json"),
    "importance out under /proc": (lambda ws: ["importance", "--model", ws.model, "--data", "digits",
                                               "--out", "/proc/amnesis-store"], "/proc/amnesis-store"),
    "train out name too long": (lambda ws: ["train", "--data", "digits", "--epochs", "1", "--out", ws / LONG],
                                "too long"),
    "evaluate out under /proc": (lambda ws: ["evaluate", "--model", ws.model, "--data", "digits",
                                             "--out", "/proc/amnesis-eval.json"], "/proc/amnesis-eval.json"),
    # ---- registered model names and stores
    "quote in model name": (lambda ws: tracked(ws, "--model-name", "evil' OR name != '"), "--model-name"),
    "slash in model name": (lambda ws: tracked(ws, "--model-name", "a/b"), "--model-name"),
    "empty model name": (lambda ws: tracked(ws, "--model-name", ""), "--model-name"),
    "model name too long": (lambda ws: tracked(ws, "--model-name", "m" * 300), "--model-name"),
    "another model into a taken name": (lambda ws: ["forget", "--model", ws.other_model, "--data", "digits",
                                                    "--forget", "class:1", "--model-name", ws.registered,
                                                    "--out", ws / "out"], "holds the versions of another model"),
    "unknown registered model": (lambda ws: forget(ws, model="models:/nope@current"), "models:/nope@current"),
    "a name other than the start's model": (lambda ws: ["forget", "--model", f"models:/{ws.registered}@current",
                                                         "--data", "digits", "--forget", "class:1", "--importance",
                                                         ws.store, "--mode", "batch", "--out", ws / "out",
                                                         "--model-name", "another-name"],
                                             "differs from the registered model"),
    "history of a quoted name": (lambda ws: ["history", "--model-name", "x' OR '1'='1"], "--model-name"),
    "process with a quoted name": (lambda ws: ["requests", "process", "--model-name", "a'b", "--data", "digits",
                                               "--ledger", ledger(ws)], "--model-name"),
    "corrupt mlflow.db": (lambda ws: with_tracking(ws, corrupt_db(ws, "broken-mlflow.db")), "mlflow"),
    "unknown tracking scheme": (lambda ws: with_tracking(ws, "gopher://nowhere"), "gopher"),
    # ---- the ledger
    "ledger URL unknown": (lambda ws: ["requests", "list", "--ledger", "oracle://x"], "ledger"),
    "ledger file corrupt": (lambda ws: ["requests", "list", "--ledger", f"sqlite:///{corrupt_db(ws, 'bad.db')}"],
                            "ledger"),
    "show a missing request": (lambda ws: ["requests", "show", "999", "--ledger", ledger(ws)], "999"),
    "reject a missing request": (lambda ws: ["requests", "reject", "999", "--reason", "x", "--ledger", ledger(ws)],
                                 "999"),
    "reject without reason": (lambda ws: ["requests", "reject", "1", "--reason", " ", "--ledger", ledger(ws)],
                              "reason"),
}


def every_train_id(ws: Workspace) -> Path:
    from unlearning.data import open_dataset

    ids = open_dataset("digits").train.ids.tolist()
    return ids_file(ws, "all-train.txt", "".join(f"{i}\n" for i in ids).encode())


def truncated_weights(ws: Workspace) -> Path:
    path = checkpoint_variant(ws, "truncated-model")
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    return path


def store_meta_text(ws: Workspace, name: str, text: str) -> Path:
    path = store_variant(ws, name)
    (path / "importance.json").write_text(text)
    return path


def corrupt_db(ws: Workspace, name: str) -> Path:
    path = ws / name
    path.write_bytes(b"SQLite format 3\x00" + os.urandom(3000))
    return path


def with_tracking(ws: Workspace, target) -> list:
    """A tracked request against another MLflow store (marker consumed by the test)."""
    uri = target if isinstance(target, str) else f"sqlite:///{target}"
    return ["@tracking", uri, *tracked(ws)]


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_and_changes_nothing(case, workspace, capsys, monkeypatch):
    build, message = CASES[case]
    argv = build(workspace)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", workspace.tracking)  # the workspace's store, with its lineage
    if argv[0] == "@tracking":
        monkeypatch.setenv("MLFLOW_TRACKING_URI", argv[1])
        argv = argv[2:]
    capsys.readouterr()
    before = snapshot(workspace.root)
    with monkeypatch.context() as patch:
        patch.chdir(workspace.root)
        try:
            code = cli(*argv)
        except SystemExit as exit_:  # argparse
            code = exit_.code
        finally:  # a case that wrongly wrote its output must not fail the cases after it
            shutil.rmtree(workspace / "out", ignore_errors=True)
    err = capsys.readouterr().err
    after = snapshot(workspace.root)
    lines = [line for line in err.strip().splitlines() if ": warning: " not in line]
    assert code == 2, f"exit {code}: {err[-2000:]}"
    assert "Traceback" not in err
    assert len(lines) == 1, err
    assert message in lines[0], lines[0]
    changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    assert not changed, f"changed: {sorted(changed)[:10]}"


def test_unrelated_models_trained_on_the_same_data_get_their_own_names(workspace, capsys):
    """The default registered name carries the original's fingerprint: a second model trained on
    digits starts its own lineage instead of taking over the first one's @current."""
    from pipelines.lineage import history

    first = workspace.registered
    assert cli("forget", "--model", workspace.other_model, "--data", "digits", "--forget", "class:1",
               "--out", workspace.root.parent / "other-run") == 0  # this test's own MLflow store
    report = json.loads((workspace.root.parent / "other-run" / "report.json").read_text())
    second = report["mlflow"]["model_name"]
    digest = json.loads((workspace.other_model / "model.json").read_text())["fingerprint"]
    assert second == f"small_cnn-digits-{digest[:8]}" and second != first
    assert [row["role"] for row in history(second)] == ["original", "unlearned"]


def test_a_remote_decoder_user_error_is_read_from_its_traceback_text():
    """Ray Data loses a decoder's exception but keeps its traceback text; the message is read off it."""
    from pipelines.distributed.worker import user_error_message

    remote = RuntimeError('Traceback (most recent call last):\n  File "x.py", line 1\n'
                          "unlearning.errors.UserError: data.parquet: the row with id 6 has inputs that are not finite\n")
    wrapped = RuntimeError("UDF failed to process a data block.")
    wrapped.__cause__ = remote
    assert user_error_message(wrapped) == "data.parquet: the row with id 6 has inputs that are not finite"
    assert user_error_message(RuntimeError("something else")) is None
