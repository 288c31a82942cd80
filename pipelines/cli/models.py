"""`unlearn train` and `unlearn evaluate`: original models and their metrics."""

from __future__ import annotations

import json


def add_commands(commands) -> None:
    train = commands.add_parser("train", help="train an original model (seeded)")
    train.add_argument("--data", required=True, help="digits, a Parquet file/dir, or an image folder")
    train.add_argument("--arch", help="architecture (default: small_cnn for small images, "
                                      "resnet_small for 32x32, mlp for features)")
    train.add_argument("--epochs", type=int, help="epochs (default: the architecture's recipe)")
    train.add_argument("--lr", type=float, help="learning rate (default: the architecture's recipe)")
    train.add_argument("--seed", type=int, default=0, help="seed of the initialisation and batch order")
    train.add_argument("--out", required=True, help="checkpoint directory to create")
    train.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda if available)")
    train.set_defaults(func=cmd_train)

    evaluate = commands.add_parser("evaluate", help="metrics of a checkpoint as JSON")
    evaluate.add_argument("--model", required=True, help="a checkpoint directory")
    evaluate.add_argument("--data", required=True, help="the data set (as for train)")
    evaluate.add_argument("--forget", help="class:K, subclass:K, random:N[:SEED], or an id file")
    evaluate.add_argument("--seed", type=int, default=0, help="seed of random:N forget sets")
    evaluate.add_argument("--out", help="also write the JSON here")
    evaluate.add_argument("--zrf", action="store_true", help="also report ZRF against a random network")
    evaluate.set_defaults(func=cmd_evaluate)


def cmd_train(args) -> int:
    from pipelines.request import check_device
    from pipelines.train import train_checkpoint

    device = check_device(args.device)
    print(train_checkpoint(args.data, args.out, args.arch, args.epochs, args.lr, args.seed, not args.quiet, device))
    return 0


def cmd_evaluate(args) -> int:
    from pipelines.train import evaluate_checkpoint
    from unlearning.checkpoint import atomic_write_text

    metrics = evaluate_checkpoint(args.model, args.data, args.forget, args.seed, args.zrf)
    text = json.dumps(metrics, indent=2) + "\n"
    if args.out:
        atomic_write_text(args.out, text)
    print(text, end="")
    return 0
