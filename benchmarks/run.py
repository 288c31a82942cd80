"""The papers' experiments and the speed figures: `python -m benchmarks.run SUITE [--quick]`.

Suites: fullclass, subclass, random, poison, speed, all. Each writes
benchmarks/results/SUITE[-quick].json (every figure, the command, the machine and its load)
and SUITE[-quick].png, and prints markdown tables. Original models and importances over D are
cached under benchmarks/cache/ (git-ignored), keyed by data, architecture, recipe and seed.

All maths comes from `unlearning/` and `pipelines/`: the suites (benchmarks/suites/) pick the
scale, build the tasks, time the calls; benchmarks/tables.py and benchmarks/plots.py draw the
results. This file is the entry point. See benchmarks/README.md for the flags.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

import unlearning
from benchmarks import suites
from benchmarks.common import (
    CIFAR10,
    RESULTS,
    Scale,
    load,
    log,
    machine,
    original_model,
    write_json,
)
from benchmarks.plots import plot
from benchmarks.tables import table
from pipelines.options import parse_param
from pipelines.ray_session import available_cpus
from unlearning.search import PTNConfig
from unlearning.training import PRECISIONS

PTN = PTNConfig()


def parse_method_param(text: str) -> tuple[str, str, object]:
    """`METHOD:KEY=VALUE` (VALUE as JSON, else a string) -> (method, key, value)."""
    usage = argparse.ArgumentTypeError(f"--param takes METHOD:KEY=VALUE, got {text!r}")
    method, sep, assignment = text.partition(":")
    try:
        key, value = parse_param(assignment)
    except unlearning.UserError as error:
        raise usage from error
    if not (sep and method and key):
        raise usage
    return method, key, value


def method_param_table(triples) -> dict:
    table: dict = {}
    for method, key, value in triples:
        table.setdefault(method, {})[key] = value
    return table


def scale_from(args) -> Scale:
    scale = Scale(
        data=Path(args.data), arch=args.arch, width=args.width, epochs=args.epochs, batch_size=args.batch_size,
        lr=args.lr, augment=not args.no_augment, label_smoothing=args.label_smoothing,
        precision=args.precision, channels_last=args.channels_last, train_rows=args.train_rows, test_rows=args.test_rows,
        classes=args.classes, retrain_epochs=args.retrain_epochs, importance_mode=args.importance_mode,
        device=args.device, inference_precision=args.inference_precision, seeds=args.seeds, quick=args.quick,
        ptn_start_divisor=args.ptn_start_divisor,
        method_params=method_param_table(args.param), references=args.references,
    )
    if args.quick:  # same code paths, smaller: a class-balanced subset, fewer epochs and requests
        scale = replace(
            scale,
            train_rows=args.train_rows or 2000,
            test_rows=args.test_rows or 500,
            classes=args.classes if args.classes is not None else [3],
            retrain_epochs=args.retrain_epochs or 4,
            seeds=args.seeds or [0],
        )
    return scale


def quick_digits(args) -> bool:
    """Quick poison runs on the built-in digits, unless --data or --arch say otherwise."""
    return args.quick and args.data == str(CIFAR10) and args.arch == "resnet_small"


def add_scale_arguments(parser: argparse.ArgumentParser) -> None:
    """The data, the original model's recipe and the requests."""
    parser.add_argument("--quick", action="store_true", help="the same code paths at reduced scale")
    parser.add_argument("--data", default=str(CIFAR10),
                        help="a directory with train.parquet and test.parquet (default: ../shared/data/cifar10 "
                             "next to the repository)")
    parser.add_argument("--arch", default="resnet_small")
    parser.add_argument("--width", type=int, default=16, help="resnet_small / small_cnn width (ignored otherwise)")
    parser.add_argument("--epochs", type=int, default=None, help="original model's epochs (default 3; quick 8)")
    parser.add_argument("--batch-size", type=int, default=None, help="default 128 (quick 32)")
    parser.add_argument("--lr", type=float, default=None, help="default 0.2 (quick 0.05)")
    parser.add_argument("--no-augment", action="store_true")
    parser.add_argument("--label-smoothing", type=float, default=0.0, help="original model's recipe")
    parser.add_argument("--precision", default="fp32", choices=PRECISIONS,
                        help="original model's (and retrain's) training precision; bf16 autocast")
    parser.add_argument("--channels-last", action="store_true", help="NHWC layout while training")
    parser.add_argument("--inference-precision", default="fp32", choices=PRECISIONS,
                        help="the requests' forward passes while they search (each method's own outcome "
                             "passes); the tables' metrics are fp32 always")
    parser.add_argument("--train-rows", type=int, default=None, help="use the first N training rows")
    parser.add_argument("--test-rows", type=int, default=None, help="use the first N test rows")
    parser.add_argument("--classes", type=int, nargs="+", default=None, help="classes (fine classes) to forget")
    parser.add_argument("--methods", nargs="+", default=None)
    parser.add_argument("--coarse", default=suites.COARSE, help="subclass: coarse groups of fine classes, a/b/...")
    parser.add_argument("--retrain-epochs", type=int, default=None, help="retrain baseline epochs (default: recipe)")
    parser.add_argument("--importance-mode", default="batch", choices=["batch", "per_sample"])
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="original-model seeds (poison: one model each)")


def add_suite_arguments(parser: argparse.ArgumentParser) -> None:
    """The suites' own settings, method parameters and where the results go."""
    parser.add_argument("--identified", type=float, nargs="+", default=None, help="poison: identified shares")
    parser.add_argument("--poison-rate", type=float, default=0.01)
    parser.add_argument("--random-count", type=int, default=100)
    parser.add_argument("--forget-seeds", type=int, nargs="+", default=None, help="random: forget-set seeds")
    parser.add_argument("--throughput-rows", type=int, default=None, help="0 skips the throughput part")
    parser.add_argument("--chunk-size", type=int, default=PTN.chunk_size,
                        help="PTN steps per Tune trial (default: unlearning.search.PTNConfig's)")
    parser.add_argument("--speed-parts", nargs="+", default=["throughput", "retrain", "ptn"])
    parser.add_argument("--ptn-start-divisor", type=float, default=None,
                        help=f"ptn / potion: s_0 = |D_f| / N / this (default: PTNConfig's {PTN.start_divisor:g})")
    parser.add_argument("--ptn-forget", default=None, help="speed: the request the PTN timing uses (default class:K)")
    parser.add_argument("--param", type=parse_method_param, action="append", default=[], metavar="METHOD:KEY=VALUE",
                        help="a method parameter for this run, e.g. jit:lr=3e-5 (repeatable)")
    parser.add_argument("--references", type=int, default=0, metavar="K",
                        help="random: also the calibrated membership test (RMIA) with K reference models "
                             "(even; trained once and cached)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: all cores; on a loaded 2-core box 1 is faster)")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--tag", default="", help="suffix of the result file names")


def check_args(parser: argparse.ArgumentParser, args) -> None:
    """One line and exit 2 for unknown --param methods and missing data, before any work."""
    for method, _, _ in args.param:
        if method not in unlearning.METHODS:
            parser.error(f"--param: unknown method {method!r}")
    needs_data = any(s != "poison" or not quick_digits(args) for s in selected(args.suite))
    if needs_data and args.data != "digits" and not Path(args.data).exists():
        # parser.error's message without its usage block, so that the one line is seen
        parser.exit(2, f"{parser.prog}: error: data directory {args.data} not found; pass --data DIR "
                       "(a directory with train.parquet and test.parquet)\n")


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("suite", choices=[*suites.SUITES, "all", "original"],
                        help="a suite, all of them, or `original`: only train (or load) the cached original model")
    add_scale_arguments(parser)
    add_suite_arguments(parser)
    args = parser.parse_args(argv)
    check_args(parser, args)
    # full scale: 3 epochs of 391 steps; quick: fewer rows, so smaller batches for enough steps
    defaults = {"epochs": 8, "batch_size": 32, "lr": 0.05} if args.quick else {"epochs": 3, "batch_size": 128, "lr": 0.2}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def selected(suite: str) -> tuple[str, ...]:
    return suites.SUITES if suite == "all" else (suite,)


def suite_scale(suite: str, args) -> Scale:
    """The scale of one suite; fills in the suite's default methods and request settings."""
    scale = scale_from(args)
    if suite == "poison":
        if quick_digits(args):
            # Quick poison runs on the built-in digits, whose model learns the backdoor in
            # seconds. Session 1's quick CIFAR-10 runs learnt none (the trigger was then written
            # before augmentation); CIFAR-10 poison runs at full scale (RESULTS.md, 44 min).
            scale = replace(scale, data=Path("digits"), arch="small_cnn", train_rows=None, test_rows=None,
                            epochs=30, batch_size=64, lr=0.05, retrain_epochs=None)
        args.methods = args.methods or suites.POISON_METHODS
        args.identified = args.identified or ([0.2, 1.0] if args.quick else [0.1, 0.2, 0.5, 1.0])
    else:
        args.methods = args.methods or suites.CLASS_METHODS
    args.forget_seeds = args.forget_seeds or ([0] if args.quick else [0, 1, 2])
    if args.throughput_rows is None:
        args.throughput_rows = 500 if args.quick else 6000
    return scale


def run_suite(suite: str, args, command: str) -> dict:
    methods_given = args.methods
    scale = suite_scale(suite, args)
    started = time.perf_counter()
    load_before = machine()
    log(f"suite {suite}{' (quick)' if args.quick else ''}: {scale}")
    result = suites.run(suite, args, scale)
    text = table(suite, result)
    seconds = time.perf_counter() - started
    name = f"{suite}{'-quick' if args.quick else ''}{args.tag}"
    result.update({
        "suite": suite, "quick": args.quick, "command": command,
        "scale": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(scale).items()},
        "machine_at_start": load_before, "machine_at_end": machine(), "wall_seconds": seconds, "table": text,
    })
    out = Path(args.out)
    write_json(out / f"{name}.json", result)
    plot(suite, result, out / f"{name}.png",
         f"{suite}{' --quick' if args.quick else ''}: {scale.arch} w{scale.width}, "
         f"{scale.train_rows or 'all'} training rows of {Path(scale.data).name}")
    print(f"\n## {name} ({seconds:.0f} s)\n\n{text}\n", flush=True)
    args.methods = methods_given
    return result


def original_only(args) -> None:
    """Train (resuming after a kill) or load the original model(s) of this scale, and say how
    good they are: the long one-off runs (ResNet-18 to 90 %) are made this way, ahead of the suites."""
    scale = scale_from(args)
    dataset, _ = load(scale)
    for seed in scale.seeds or [0]:
        _, info = original_model(scale, dataset, seed, log=log)
        log(f"original {scale.arch} seed {seed}: test acc {info['test_acc']:.4f}, train acc {info['train_acc']:.4f}, "
            f"{info['train_seconds']:.0f} s to train")


def main(argv=None) -> None:
    args = parse(argv)
    torch.set_num_threads(args.threads or available_cpus())
    command = "python -m benchmarks.run " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    started = time.perf_counter()
    if args.suite == "original":
        original_only(args)
    for suite in () if args.suite == "original" else selected(args.suite):
        run_suite(suite, args, command)
    log(f"done in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
