"""The deletion-request ledger: exactly once under real SIGKILLs, concurrency, 1,000 requests;
and on PostgreSQL through psycopg (the `postgres` extra), as the cluster's RayCronJob runs it."""

from __future__ import annotations

import glob
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from pipelines.ledger import Busy, Ledger, process_pending
from pipelines.request import ForgetOptions
from pipelines.tracking import lineage_removed_ids

MODEL = "ledger-model"
FAST = ["--method", "ssd"]  # fixed alpha/lambda: the ledger logic is what is under test
PAUSED = Path(__file__).resolve().parent / "paused_process.py"


def process_command(ledger_url, checkpoint, out_root):
    return [sys.executable, "-m", "pipelines.cli", "--quiet", "requests", "process", "--ledger", ledger_url,
            "--model-name", MODEL, "--data", "digits", "--initial-model", str(checkpoint),
            "--out-root", str(out_root), *FAST]


def start_paused(ledger_url, checkpoint, out_root, step, tmp_path):
    """`process_pending` in a child process, stopped at `step` (see paused_process.py)."""
    marker = tmp_path / f"paused-{step}"
    command = [sys.executable, str(PAUSED), ledger_url, str(checkpoint), str(out_root), MODEL, step, str(marker)]
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not marker.exists():
        if child.poll() is not None:
            raise AssertionError(f"process ended before {step}: {child.communicate()}")
        assert time.monotonic() < deadline, f"never reached {step}"
        time.sleep(0.2)
    return child


def unlearned_versions():
    versions = MlflowClient().search_model_versions(f"name = '{MODEL}'")
    return sorted((v for v in versions if v.tags.get("role") == "unlearned"), key=lambda v: int(v.version))


def digits_train_ids(digits, count, offset=0):
    return [int(i) for i in digits.train.ids[offset : offset + count]]


@pytest.mark.parametrize("step", ["claimed", "unlearning", "logged", "registered", "finished"])
def test_process_killed_at_any_step_then_rerun_applies_each_request_exactly_once(
    tmp_path, digits, digits_checkpoint, step
):
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    ledger = Ledger(url)
    first, second = digits_train_ids(digits, 3), digits_train_ids(digits, 2, offset=10)
    ledger.add(first, requester="a", reason="art. 17")
    ledger.add(second, requester="b", reason="art. 17")

    child = start_paused(url, digits_checkpoint, tmp_path / "runs", step, tmp_path)
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL

    summary = process_pending(ledger, MODEL, "digits", tmp_path / "runs", str(digits_checkpoint),
                              ForgetOptions(method="ssd"))
    if step == "finished":
        assert summary["batch"] is None  # the killed run had completed everything
    else:
        assert summary["batch"] == 1 and summary["resumed"] == (step != "finished")
        assert summary["adopted"] == (step in ("logged", "registered"))
    requests = ledger.list()
    assert [r["status"] for r in requests] == ["done", "done"]
    versions = unlearned_versions()
    assert len(versions) == 1, "each request is applied exactly once"
    assert {r["model_version"] for r in requests} == {str(versions[0].version)}
    assert lineage_removed_ids(MODEL, str(versions[0].version)) == sorted(first + second)
    assert str(MlflowClient().get_model_version_by_alias(MODEL, "current").version) == str(versions[0].version)
    assert ledger.batch(1)["attempts"] == (1 if step == "finished" else 2)
    assert process_pending(ledger, MODEL, "digits", tmp_path / "runs")["batch"] is None


def test_a_second_process_does_not_take_requests_that_are_being_processed(tmp_path, digits, digits_checkpoint):
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    ledger = Ledger(url)
    ledger.add(digits_train_ids(digits, 4))
    child = start_paused(url, digits_checkpoint, tmp_path / "runs", "unlearning", tmp_path)
    try:
        with pytest.raises(Busy, match="being processed"):
            process_pending(ledger, MODEL, "digits", tmp_path / "runs", str(digits_checkpoint))
        ledger.add(digits_train_ids(digits, 2, offset=20))  # arrives meanwhile: waits for the next batch
        with pytest.raises(Busy):
            ledger.claim()
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    process_pending(ledger, MODEL, "digits", tmp_path / "runs", str(digits_checkpoint), ForgetOptions(method="ssd"))
    process_pending(ledger, MODEL, "digits", tmp_path / "runs", str(digits_checkpoint), ForgetOptions(method="ssd"))
    assert [r["batch_id"] for r in ledger.list()] == [1, 2]
    versions = unlearned_versions()
    assert [v.tags["parent_version"] for v in versions] == ["1", str(versions[0].version)]  # a chain, no fork


def test_two_processes_started_together_work_on_disjoint_requests(tmp_path, digits, digits_checkpoint):
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    ledger = Ledger(url)
    ledger.add(digits_train_ids(digits, 5))
    command = process_command(url, digits_checkpoint, tmp_path / "runs")
    children = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [child.communicate(timeout=300) for child in children]
    assert [child.returncode for child in children] == [0, 0], outputs
    said = " ".join(out for out, _ in outputs)
    assert said.count("requests done") == 1 and "nothing to do" in said
    assert len(unlearned_versions()) == 1, [(v.version, v.tags) for v in unlearned_versions()] + outputs
    assert ledger.list()[0]["status"] == "done"


def test_one_thousand_queued_requests_are_processed_in_one_batch(tmp_path, digits, digits_checkpoint):
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
    ids = digits_train_ids(digits, 400)
    numbers = ledger.add_many([([ids[i % 400], ids[(7 * i) % 400]], f"user{i}", "erasure") for i in range(1000)])
    assert len(numbers) == 1000 and len(ledger.list("pending")) == 1000
    summary = process_pending(ledger, MODEL, "digits", tmp_path / "runs", str(digits_checkpoint),
                              ForgetOptions(method="ssd"))
    assert summary["batch"] == 1 and summary["processed"] == 1000
    assert {r["status"] for r in ledger.list()} == {"done"}
    versions = unlearned_versions()
    assert len(versions) == 1 and int(versions[0].tags["forget_size"]) == 400
    assert lineage_removed_ids(MODEL, str(versions[0].version)) == sorted(ids)


def test_unknown_ids_reject_only_their_request(tmp_path, digits, digits_checkpoint):
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
    good = ledger.add(digits_train_ids(digits, 2))
    bad = ledger.add([10**9])
    process_pending(ledger, MODEL, "digits", tmp_path / "runs", str(digits_checkpoint), ForgetOptions(method="ssd"))
    assert ledger.get(good)["status"] == "done"
    rejected = ledger.get(bad)
    assert rejected["status"] == "rejected" and "not in the data" in rejected["note"]


def test_requests_cli_add_list_show(tmp_path, capsys):
    from pipelines.cli import main

    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    (tmp_path / "ids.txt").write_text("4\n5\n")
    assert main(["requests", "add", "--ledger", url, "--ids", "1,2", "--requester", "ann", "--reason", "art. 17"]) == 0
    assert main(["requests", "add", "--ledger", url, "--file", str(tmp_path / "ids.txt")]) == 0
    assert main(["requests", "list", "--ledger", url, "--json"]) == 0
    out = capsys.readouterr().out
    assert '"requester": "ann"' in out and '"status": "pending"' in out
    assert main(["requests", "show", "--ledger", url, "2"]) == 0
    assert '"ids": [\n    4,\n    5\n  ]' in capsys.readouterr().out
    assert main(["requests", "add", "--ledger", url, "--ids", "x"]) == 2
    assert main(["requests", "show", "--ledger", url, "9"]) == 2
    assert "request 9 is not in the ledger" in capsys.readouterr().err


@pytest.fixture(scope="module")
def postgres_url():
    """A private PostgreSQL server on loopback for this module (as the `postgres` user when root)."""
    pytest.importorskip("psycopg")
    binaries = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb")) or [shutil.which("initdb")]
    if not binaries[-1]:
        pytest.skip("no PostgreSQL server binaries (initdb)")
    bin_dir = Path(binaries[-1]).parent
    root = Path(tempfile.mkdtemp(prefix="amnesis-pg-"))  # not under pytest's root-only tmp dirs

    def as_owner(*command: str) -> None:
        line = shlex.join(command)
        run = ["su", "postgres", "-c", line] if os.geteuid() == 0 else ["sh", "-c", line]
        subprocess.run(run, check=True, capture_output=True, timeout=120)

    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    data = str(root / "data")
    as_owner(str(bin_dir / "initdb"), "-D", data, "-A", "trust", "-U", "postgres", "--no-sync")
    as_owner(str(bin_dir / "pg_ctl"), "-D", data, "-l", str(root / "log"), "-w", "start",
             "-o", f"-k {root} -p {port} -c listen_addresses=127.0.0.1")
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    finally:
        as_owner(str(bin_dir / "pg_ctl"), "-D", data, "-m", "immediate", "stop")
        shutil.rmtree(root, ignore_errors=True)


def test_the_ledger_on_postgresql_processes_requests_once_and_one_claimer_at_a_time(
    postgres_url, tmp_path, digits, digits_checkpoint, monkeypatch, capsys
):
    from pipelines.cli import main

    monkeypatch.setenv("AMNESIS_LEDGER_URL", postgres_url)  # as the RayCronJob sets it
    ids = ",".join(map(str, digits_train_ids(digits, 3)))
    assert main(["requests", "add", "--ids", ids, "--requester", "ann"]) == 0
    assert main(["requests", "process", "--model-name", MODEL, "--data", "digits", "--initial-model",
                 str(digits_checkpoint), "--out-root", str(tmp_path / "runs"), "--quiet", *FAST]) == 0
    assert "batch 1: 1 requests done" in capsys.readouterr().out
    ledger = Ledger(postgres_url)
    assert [(r["status"], r["batch_id"]) for r in ledger.list()] == [("done", 1)]
    assert len(unlearned_versions()) == 1

    ledger.add(digits_train_ids(digits, 2, offset=10))
    assert ledger.claim().batch_id == 2  # this process owns batch 2 now, and is alive
    with pytest.raises(Busy, match="batch 2 is being processed"):
        Ledger(postgres_url).claim()
