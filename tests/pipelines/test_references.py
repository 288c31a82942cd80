"""`unlearn references` trains the calibrated test's reference models as Ray tasks, and
`unlearn evaluate --references` reports the test; bad requests are refused in one line."""

from __future__ import annotations

import json

import pytest

import unlearning
from pipelines.cli import main
from unlearning.metrics import accuracy
from unlearning.mia import load_references

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("ray_session")]


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_references_on_ray_then_the_calibrated_test(tmp_path, capsys, digits_checkpoint):
    code, out, err = run(capsys, "references", "--model", digits_checkpoint, "--data", "digits",
                         "--out", tmp_path / "refs", "--count", "4", "--epochs", "10")
    assert code == 0, err
    assert "4 reference models on Ray, 2 at a time" in out and "RMIA a = " in out
    references = load_references(tmp_path / "refs")
    assert len(references.models) == 4 and references.members.shape == (4, 1438)
    info = json.loads((tmp_path / "refs" / "references.json").read_text())
    assert info["recipe"]["epochs"] == 10 and 0.0 <= info["a"] <= 1.0
    digits = unlearning.load_dataset("digits")
    for model in references.models:  # each learnt its half: far above the 10 % of chance
        assert accuracy(model, digits.test, digits.normalization()) > 0.8

    code, out, err = run(capsys, "evaluate", "--model", digits_checkpoint, "--data", "digits",
                         "--forget", "random:100", "--references", tmp_path / "refs")
    assert code == 0, err
    metrics = json.loads(out)
    assert 0.0 <= metrics["rmia_auc"] <= 1.0 and 0.0 <= metrics["rmia_flagged"] <= 1.0
    assert 0.0 <= metrics["mia"] <= 1.0  # the loss-threshold MIA stays beside it


def test_bad_reference_requests(tmp_path, capsys, digits_checkpoint, untrained_digits_checkpoint, parquet_dir):
    code, _, err = run(capsys, "references", "--model", digits_checkpoint, "--data", "digits",
                       "--out", tmp_path / "r", "--count", "3")
    assert code == 2 and "--count must be an even number" in err and not (tmp_path / "r").exists()
    code, _, err = run(capsys, "references", "--model", untrained_digits_checkpoint, "--data", "digits",
                       "--out", tmp_path / "r")
    assert code == 2 and "has no" in err and "recipe" in err
    code, _, err = run(capsys, "references", "--model", digits_checkpoint, "--data", "digits",
                       "--out", tmp_path / "r", "--workers", "1000")
    assert code == 2 and "--workers 1000" in err
    code, _, err = run(capsys, "evaluate", "--model", digits_checkpoint, "--data", "digits",
                       "--references", tmp_path / "r")
    assert code == 2 and "--references needs --forget" in err
    code, _, err = run(capsys, "evaluate", "--model", digits_checkpoint, "--data", "digits",
                       "--forget", "class:1", "--references", tmp_path)
    assert code == 2 and "is not a reference directory" in err
    assert err.count("\n") == 1


def test_references_in_process_and_of_another_data_set(tmp_path, capsys, digits_checkpoint):
    code, out, err = run(capsys, "references", "--model", digits_checkpoint, "--data", "digits",
                         "--out", tmp_path / "refs", "--count", "2", "--epochs", "2", "--in-process")
    assert code == 0, err
    assert "2 reference models in this process" in out and "RMIA a = 0.3" in out  # one pair: a is not chosen
    info_path = tmp_path / "refs" / "references.json"
    info = json.loads(info_path.read_text())
    info_path.write_text(json.dumps({**info, "data_fingerprint": "0" * 16}))
    code, _, err = run(capsys, "evaluate", "--model", digits_checkpoint, "--data", "digits",
                       "--forget", "class:1", "--references", tmp_path / "refs")
    assert code == 2 and "not on this data set" in err
