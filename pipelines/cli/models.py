"""`unlearn train`, `unlearn import` and `unlearn evaluate`: original models and their metrics."""

from __future__ import annotations

import argparse
import json

from pipelines.cli.common import key_value, positive_int, positive_number

ARCH_HELP = ("a built-in architecture (mlp, small_cnn, resnet_small, torchvision:resnet18, "
             "torchvision:vit_b_16), torchvision:NAME, timm:NAME, or your factory package.module:callable")


def add_commands(commands) -> None:
    train = commands.add_parser("train", help="train an original model (seeded)")
    train.add_argument("--data", required=True, help="digits, a Parquet file/dir, or an image folder")
    train.add_argument("--arch", metavar="FACTORY", help=ARCH_HELP + " (default: small_cnn for small images, "
                       "resnet_small for 32x32, mlp for features)")
    train.add_argument("--arch-arg", type=key_value, action="append", metavar="KEY=VALUE",
                       help="a keyword argument of the architecture's factory (repeatable)")
    train.add_argument("--epochs", type=positive_int, help="epochs (default: the architecture's recipe)")
    train.add_argument("--lr", type=positive_number, help="learning rate (default: the architecture's recipe)")
    train.add_argument("--seed", type=int, default=0, help="seed of the initialisation and batch order")
    train.add_argument("--out", required=True, help="checkpoint directory to create")
    train.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda if available)")
    train.add_argument("--precision", choices=["fp32", "bf16"],
                       help="bf16: autocast (2-3x faster on GPUs and AMX CPUs; default: the recipe's, fp32)")
    train.set_defaults(func=cmd_train)

    imported = commands.add_parser("import", help="a checkpoint from weights trained elsewhere and the factory "
                                                  "that builds their network")
    imported.add_argument("--factory", required=True, metavar="FACTORY", help=ARCH_HELP)
    imported.add_argument("--factory-arg", type=key_value, action="append", metavar="KEY=VALUE",
                          help="a keyword argument of the factory (repeatable)")
    imported.add_argument("--weights", required=True,
                          help="a state dict: .safetensors, or a torch file (read with weights_only=True)")
    imported.add_argument("--input-shape", required=True, type=_shape, metavar="C,H,W",
                          help="one input's shape without the batch dimension, e.g. 3,32,32 (or 64 for features)")
    imported.add_argument("--num-classes", type=positive_int, help="default: read from the model's output")
    imported.add_argument("--mean", type=_floats, metavar="M1,M2,...",
                          help="per-channel mean the model's inputs are normalised with (with --std)")
    imported.add_argument("--std", type=_floats, metavar="S1,S2,...", help="per-channel std (with --mean)")
    imported.add_argument("--data", help="check the model on this data set's test split and record it")
    imported.add_argument("--out", required=True, help="checkpoint directory to create")
    imported.set_defaults(func=cmd_import)

    evaluate = commands.add_parser("evaluate", help="metrics of a checkpoint as JSON")
    evaluate.add_argument("--model", required=True, help="a checkpoint directory")
    evaluate.add_argument("--data", required=True, help="the data set (as for train)")
    evaluate.add_argument("--forget", help="class:K, subclass:K, random:N[:SEED], or an id file")
    evaluate.add_argument("--seed", type=int, default=0, help="seed of random:N forget sets")
    evaluate.add_argument("--out", help="also write the JSON here")
    evaluate.add_argument("--zrf", action="store_true", help="also report ZRF against a random network")
    evaluate.add_argument("--references", metavar="DIR",
                          help="also report the calibrated membership test (RMIA) with these reference models "
                               "(`unlearn references`); needs --forget")
    evaluate.set_defaults(func=cmd_evaluate)

    hyper = commands.add_parser("hyperforget", help="HyperForget's hypernetwork: checkpoints on Ray, then DiHyFo")
    actions = hyper.add_subparsers(dest="action", required=True, metavar="train")
    train_hyper = actions.add_parser("train", help="collect training runs' checkpoints and train the hypernetwork")
    train_hyper.add_argument("--model", required=True, help="the original checkpoint (its architecture and recipe)")
    train_hyper.add_argument("--data", required=True, help="its training data (as for train)")
    train_hyper.add_argument("--out", required=True, help="hypernetwork directory to create")
    train_hyper.add_argument("--runs", type=positive_int, default=22,
                             help="training runs: on every class, and leaving classes out in turn (default 22)")
    train_hyper.add_argument("--epochs", type=positive_int, help="epochs per run (default: the original's recipe)")
    train_hyper.add_argument("--every", type=positive_int, help="optimiser steps between snapshots (default: an epoch)")
    train_hyper.add_argument("--steps", type=positive_int, default=4000, help="denoiser training steps (default 4000)")
    train_hyper.add_argument("--components", type=positive_int, default=512,
                             help="principal directions of the checkpoints diffused over (default 512)")
    train_hyper.add_argument("--checkpoints", metavar="DIR",
                             help="where the runs' Parquet shards go and are found again after a kill "
                                  "(default: OUT.checkpoints)")
    train_hyper.add_argument("--workers", type=int, help="runs at once on Ray, and Ray Train workers for the "
                                                         "denoiser (default 2, or the cluster's GPUs/CPUs)")
    train_hyper.add_argument("--in-process", action="store_true", help="everything here, one run after another (no Ray)")
    train_hyper.add_argument("--no-track", action="store_true", help="do not record the training in MLflow")
    train_hyper.set_defaults(func=cmd_hyperforget_train)

    references = commands.add_parser("references", help="reference models for the calibrated membership test "
                                                         "(RMIA), trained on Ray in pairs on halves of the data")
    references.add_argument("--model", required=True, help="the original checkpoint (its architecture and recipe)")
    references.add_argument("--data", required=True, help="its training data (as for train)")
    references.add_argument("--out", required=True, help="reference directory to create")
    references.add_argument("--count", type=positive_int, default=4, help="reference models, even (default 4)")
    references.add_argument("--epochs", type=positive_int, help="epochs each (default: the original's recipe)")
    references.add_argument("--seed", type=int, default=0, help="seed of the halves and of the initialisations")
    references.add_argument("--workers", type=int, help="references trained at once (default 2, or the GPUs/CPUs "
                                                        "the cluster has, if fewer)")
    references.add_argument("--in-process", action="store_true", help="train them here, one after another (no Ray)")
    references.set_defaults(func=cmd_references)


def cmd_train(args) -> int:
    from pipelines.options import check_device
    from pipelines.train import train_checkpoint
    from unlearning.outputs import check_output_path

    check_output_path(args.out)
    device = check_device(args.device)
    print(train_checkpoint(args.data, args.out, args.arch, args.epochs, args.lr, args.seed, not args.quiet, device,
                           arch_args=dict(args.arch_arg or []), precision=args.precision))
    return 0


def cmd_import(args) -> int:
    from pipelines.train import import_checkpoint
    from unlearning.errors import UserError
    from unlearning.outputs import check_output_path

    check_output_path(args.out)
    if (args.mean is None) != (args.std is None):
        raise UserError("--mean and --std go together")
    normalize = {"mean": args.mean, "std": args.std} if args.mean is not None else None
    if normalize is not None:
        from unlearning.checkpoint import check_normalize

        check_normalize(normalize, args.input_shape[0] if len(args.input_shape) > 1 else None, "--mean/--std")
    print(import_checkpoint(args.factory, dict(args.factory_arg or []), args.weights, args.input_shape, args.out,
                            normalize=normalize, num_classes=args.num_classes, data_spec=args.data))
    return 0


def _shape(text: str) -> list[int]:
    try:
        shape = [int(part) for part in text.split(",")]
    except ValueError:
        shape = []
    if not shape or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a shape like 3,32,32")
    return shape


def _floats(text: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from None


def cmd_evaluate(args) -> int:
    from pipelines.train import evaluate_checkpoint
    from unlearning.errors import UserError
    from unlearning.outputs import atomic_write_text, check_output_path

    if args.out:
        check_output_path(args.out)
    if args.references and not args.forget:
        raise UserError("--references needs --forget: the test asks whether the forget set still looks seen")
    metrics = evaluate_checkpoint(args.model, args.data, args.forget, args.seed, args.zrf, args.references)
    text = json.dumps(metrics, indent=2) + "\n"
    if args.out:
        atomic_write_text(args.out, text)
    print(text, end="")
    return 0


def cmd_references(args) -> int:
    from pipelines.ray_session import check_workers
    from pipelines.references import build_references
    from unlearning.errors import UserError
    from unlearning.outputs import check_output_path

    check_output_path(args.out)
    if args.count < 2 or args.count % 2:
        raise UserError(f"--count must be an even number of at least 2 (references come in pairs), got {args.count}")
    if not args.in_process:
        check_workers(args.workers)
    info = build_references(args.model, args.data, args.out, args.count, args.seed, args.epochs, args.workers,
                            args.in_process)
    print(f"{info['count']} reference models {info['where']} in {info['train_seconds']:.1f} s, RMIA a = {info['a']:g} "
          f"-> {args.out}")
    return 0


def cmd_hyperforget_train(args) -> int:
    from pipelines.hyperforget import train_hyperforget
    from pipelines.ray_session import check_workers
    from unlearning.hyperforget import HypernetConfig
    from unlearning.outputs import check_output_path

    check_output_path(args.out)
    if not args.in_process:
        check_workers(args.workers)
    config = HypernetConfig(steps=args.steps, components=args.components)
    info = train_hyperforget(args.model, args.data, args.out, args.runs, args.every, args.epochs, args.workers,
                             args.checkpoints, config, args.in_process, track=not args.no_track)
    print(f"hypernetwork {args.out}: {info['checkpoints']} checkpoints of {info['runs']} runs "
          f"({info['runs_kept']} found from before) in {info['collect_seconds']:.1f} s, {info['components']} "
          f"directions of {info['parameters']} parameters, denoiser {args.steps} steps in {info['train_seconds']:.1f} s "
          f"(final loss {info['final_loss']:.4f})")
    return 0
