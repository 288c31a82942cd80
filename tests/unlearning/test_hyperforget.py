"""HyperForget in the library: the run plan, the checkpoints' basis, the sampler, and the method
on a tiny collection (6 runs of 5 epochs of the session's digits CNN, 300 denoiser steps)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from tests.unlearning.test_methods import make_task
from unlearning.checkpoint import model_meta
from unlearning.errors import UserError
from unlearning.hyperforget import (
    HypernetConfig,
    collect_run,
    flatten,
    load_hypernet,
    plan_runs,
    probe_rows,
    save_hypernet,
    train_hypernet,
    with_parameters,
)
from unlearning.hyperforget.diffusion import Basis
from unlearning.methods import run_method
from unlearning.metrics import accuracy
from unlearning.training import TrainConfig


def test_the_plan_covers_every_class_alone_then_in_pairs():
    plans = plan_runs(3, 9, seed=1)
    assert [p.left_out for p in plans] == [(), (0,), (1,), (2,), (), (0, 1), (1, 2), (0, 2), ()]
    assert len({p.seed for p in plans}) == 9 and plans == plan_runs(3, 9, seed=1)


def test_the_basis_represents_every_checkpoint():
    generator = torch.Generator().manual_seed(0)
    params = torch.randn(12, 300, generator=generator) * torch.linspace(0.01, 3, 300) + 5
    basis = Basis.fit(params, components=512, chunk=64)  # chunks smaller than D: the Gram sums add up
    assert basis.scales.numel() == 11  # N - 1 directions around the mean
    torch.testing.assert_close(basis.decode(basis.encode(params)), params, atol=2e-4, rtol=1e-5)
    z = basis.encode(params)
    torch.testing.assert_close(z.std(0), torch.ones(11), atol=1e-3, rtol=0)  # whitened


def test_flatten_and_with_parameters_round_trip(digits_model):
    vector = flatten(digits_model)
    assert vector.numel() == sum(p.numel() for p in digits_model.parameters())
    clone = with_parameters(digits_model, vector * 2)
    assert torch.equal(flatten(clone), vector * 2) and torch.equal(flatten(digits_model), vector)


@pytest.fixture(scope="module")
def collection(digits, digits_model):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the loaded 2-core machine: one thread is faster (tests/unlearning/test_modern_baselines.py)
    config = replace(TrainConfig(**model_meta(digits_model)["train_config"]), epochs=5)
    probe_ids = probe_rows(digits)
    probe = digits.train.subset(digits.index_of(probe_ids))
    params, losses, final, left_out = [], [], [], []
    for plan in plan_runs(10, 6):
        snapshots = collect_run(digits_model, digits, plan, config, probe, every=23)
        params += [s["params"] for s in snapshots]
        losses += [s["losses"] for s in snapshots]
        final += [i == len(snapshots) - 1 for i in range(len(snapshots))]
        left_out += [plan.left_out] * len(snapshots)
    info = {"arch": "small_cnn", "parameters": params[0].numel()}
    net = train_hypernet(torch.stack(params), torch.stack(losses), torch.tensor(final), left_out, probe_ids,
                         HypernetConfig(steps=300), info)
    yield net, torch.stack(losses), left_out
    torch.set_num_threads(threads)


def test_runs_without_a_class_end_with_a_high_loss_on_it(collection):
    net, losses, left_out = collection
    run_without_2 = [i for i, left in enumerate(left_out) if left == (2,)]
    assert losses[run_without_2[-1], 2] > 5 * losses[run_without_2[-1], 3]  # class 2 never seen
    assert float(net.forgotten_loss[2]) == pytest.approx(float(losses[run_without_2[-1], 2]), rel=1e-5)


def test_samples_are_seeded_and_survive_a_save(collection, tmp_path):
    net, _, _ = collection
    wanted = torch.exp(net.feature_mean.double())
    first = net.sample(wanted, [0, 1])
    assert torch.equal(first, net.sample(wanted, [0, 1])) and not torch.equal(first[0], first[1])
    save_hypernet(net, tmp_path / "hn")
    assert torch.equal(load_hypernet(tmp_path / "hn").sample(wanted, [0, 1]), first)
    with pytest.raises(UserError, match="not a hypernetwork directory"):
        load_hypernet(tmp_path)


def test_hyperforget_forgets_a_class_it_saw_left_out(collection, digits, digits_model, tmp_path):
    net, _, _ = collection
    save_hypernet(net, tmp_path / "hn")
    output = run_method("hyperforget", make_task(digits, digits_model, "class:1"), hypernet=str(tmp_path / "hn"),
                        samples=4)
    normalize = digits.normalization()
    test_forgotten = digits.test.where(digits.test.labels == 1)
    test_kept = digits.test.where(digits.test.labels != 1)
    details = output.details
    assert details["reached"] and len(details["sample_forget_acc"]) == 4
    assert accuracy(output.model, test_forgotten, normalize) <= 0.05
    # tiny collection and denoiser: measured 0.954 against 0.994 (the benchmark's
    # defaults keep it within 3, benchmarks/RESULTS.md)
    assert accuracy(output.model, test_kept, normalize) >= accuracy(digits_model, test_kept, normalize) - 0.08
    assert details["spread"]["retain_acc"][0] <= details["spread"]["retain_acc"][1]
    with pytest.raises(UserError, match="whole classes"):
        run_method("hyperforget", make_task(digits, digits_model, "random:5"), hypernet=str(tmp_path / "hn"))
