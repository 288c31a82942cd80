"""`unlearn`: the command line. Each sub-command is one function; user errors are one line.

    unlearn train      --data DATA [--arch NAME] [--epochs E] [--seed S] --out CKPT
    unlearn evaluate   --model CKPT --data DATA [--forget SPEC] [--out FILE]
    unlearn importance --model CKPT --data DATA --out STORE [--workers N] [--kind K] [--mode M]
    unlearn forget     --model CKPT --data DATA --forget SPEC --out DIR [--method NAME] ...
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace

from unlearning.errors import UserError


def _number_list(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def _parse_param(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--param takes KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


# ------------------------------------------------------------------ train


def default_arch(dataset) -> str:
    if dataset.input_kind != "image":
        return "mlp"
    return "small_cnn" if dataset.input_shape[-1] < 16 else "resnet_small"


def cmd_train(args) -> int:
    import torch
    from tqdm import tqdm

    import unlearning
    from pipelines.request import default_device
    from unlearning.evaluation import evaluate_model
    from unlearning.training import DEFAULT_RECIPES, TrainConfig, train

    dataset = unlearning.load_dataset(args.data)
    arch = args.arch or default_arch(dataset)
    recipe = DEFAULT_RECIPES.get(arch, TrainConfig())
    config = replace(
        recipe,
        epochs=args.epochs if args.epochs is not None else recipe.epochs,
        seed=args.seed,
        lr=args.lr if args.lr is not None else recipe.lr,
    )
    if config.epochs < 1:
        raise UserError(f"--epochs must be at least 1, got {config.epochs}")
    if os.path.exists(args.out):
        raise UserError(f"{args.out} already exists; choose a new output path (nothing is overwritten)")
    normalize = dataset.normalization()
    model = unlearning.new_model(arch, dataset.num_classes, dataset.input_shape, normalize, seed=args.seed)
    device = default_device()
    started = time.perf_counter()
    total = config.epochs * len(dataset.train)
    with tqdm(total=total, desc=f"train {arch}", unit="sample", disable=args.quiet, leave=False) as bar:
        train(model, dataset.train, config, normalize, device=device, on_step=lambda n, _: bar.update(n))
    seconds = time.perf_counter() - started
    model.amnesis_meta["train_config"] = config.to_dict()
    model.amnesis_meta["dataset"] = {"spec": str(args.data), "fingerprint": dataset.fingerprint}
    with torch.no_grad():
        metrics = evaluate_model(model, dataset, None, normalize)
    fingerprint = unlearning.save_model(model.cpu(), args.out)
    print(
        f"trained {arch} on {dataset.name} ({len(dataset.train)} samples, {config.epochs} epochs, "
        f"{seconds:.1f} s): train acc {metrics['train_acc']:.3f}, test acc {metrics['test_acc']:.3f} "
        f"-> {args.out} ({fingerprint})"
    )
    return 0


# ------------------------------------------------------------------ evaluate


def cmd_evaluate(args) -> int:
    import unlearning
    from unlearning.checkpoint import atomic_write_text
    from unlearning.evaluation import evaluate_model

    model = unlearning.load_model(args.model)
    dataset = unlearning.load_dataset(args.data)
    forget = unlearning.parse_forget(args.forget, dataset, seed=args.seed) if args.forget else None
    metrics = evaluate_model(model, dataset, forget, model.amnesis_meta.get("normalize"))
    text = json.dumps(metrics, indent=2) + "\n"
    if args.out:
        atomic_write_text(args.out, text)
    print(text, end="")
    return 0


# ------------------------------------------------------------------ forget


def cmd_forget(args) -> int:
    from pipelines.progress import StepProgress
    from pipelines.request import ForgetOptions, run_forget
    from pipelines.summary import print_report

    params = dict(args.param or [])
    if args.alpha is not None:
        params["alpha"] = args.alpha
    if args.lam is not None:
        params["lam"] = args.lam
    if args.search and (params or args.method != "ptn"):
        raise UserError("--search chooses alpha and lambda itself; drop --method, --alpha, --lambda and --param")
    options = ForgetOptions(
        method=args.method,
        params=params,
        importance_store=args.importance,
        mode=args.mode,
        batch_size=args.batch_size,
        seed=args.seed,
        rho=args.rho,
        search=args.search,
        track=not args.no_track,
        model_name=args.model_name,
        compare_retrain=args.compare_retrain,
    )
    if not args.importance:
        print(
            "note: no --importance store given, so the full-data importance is computed now; "
            "`unlearn importance` once makes every later request cheaper",
            file=sys.stderr,
        )
    with StepProgress("search steps", disable=args.quiet) as progress:
        report = run_forget(args.model, args.data, args.forget, args.out, options, progress=progress.on_result)
    print_report(report, args.out)
    return 0


def cmd_history(args) -> int:
    from pipelines.tracking import history, tracking_uri

    rows = history(args.model_name)
    if not rows:
        raise UserError(f"model {args.model_name!r} has no versions at {tracking_uri()}")
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'version':>7}  {'parent':>6}  {'role':<10} {'method':<8} {'removed':>7}  forget set")
    for row in rows:
        mark = " @current" if row["current"] else ""
        print(
            f"{row['version']:>7}  {row['parent_version'] or '-':>6}  {row['role']:<10} {row['method'] or '-':<8} "
            f"{row['forget_size']:>7}  {row['forget_spec'] or '-'}{mark}"
        )
    if args.ids:
        from pipelines.tracking import removed_ids

        for row in rows:
            if row["role"] == "unlearned":
                print(f"version {row['version']} removed: {' '.join(map(str, removed_ids(args.model_name, row['version'])))}")
    return 0


# ------------------------------------------------------------------ importance


def cmd_importance(args) -> int:
    from pipelines.importance import run_importance_command

    return run_importance_command(args) or 0


# ------------------------------------------------------------------ demo


def cmd_demo(args) -> int:
    from pipelines.demo import run_demo

    run_demo(args.root, quiet=args.quiet)
    return 0


# ------------------------------------------------------------------ parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unlearn", description="Make trained models forget data.")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser("train", help="train an original model (seeded)")
    train.add_argument("--data", required=True, help="digits, a Parquet file/dir, or an image folder")
    train.add_argument("--arch", help="architecture (default: small_cnn for small images, resnet_small for 32x32, mlp for features)")
    train.add_argument("--epochs", type=int)
    train.add_argument("--lr", type=float)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--out", required=True, help="checkpoint directory to create")
    train.set_defaults(func=cmd_train)

    evaluate = commands.add_parser("evaluate", help="metrics of a checkpoint as JSON")
    evaluate.add_argument("--model", required=True)
    evaluate.add_argument("--data", required=True)
    evaluate.add_argument("--forget", help="class:K, subclass:K, random:N[:SEED], or an id file")
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--out", help="also write the JSON here")
    evaluate.set_defaults(func=cmd_evaluate)

    forget = commands.add_parser("forget", help="process one deletion request")
    search = commands.add_parser("search", help="a deletion request with a parallel search on Ray Tune")
    for sub in (forget, search):
        _request_arguments(sub, search_required=sub is search)

    history = commands.add_parser("history", help="a registered model's versions and what each removed")
    history.add_argument("--model-name", required=True)
    history.add_argument("--ids", action="store_true", help="also list the removed ids")
    history.add_argument("--json", action="store_true")
    history.set_defaults(func=cmd_history)

    demo = commands.add_parser("demo", help="the quick-start on the built-in digits data")
    demo.add_argument("--root", default="demo-output", help="where the run directory is created")
    demo.set_defaults(func=cmd_demo)

    importance = commands.add_parser("importance", help="build an importance store on Ray")
    try:
        from pipelines.importance import add_importance_arguments

        add_importance_arguments(importance)
    except ImportError:  # the Ray pipeline is not installed in this checkout
        pass
    importance.set_defaults(func=cmd_importance)
    return parser


def _request_arguments(forget: argparse.ArgumentParser, search_required: bool) -> None:
    forget.add_argument("--model", required=True, help="a checkpoint directory or models:/NAME@current")
    forget.add_argument("--data", required=True)
    forget.add_argument("--forget", required=True, help="class:K, subclass:K, random:N[:SEED], or an id file")
    forget.add_argument("--out", required=True, help="run directory to create")
    forget.add_argument("--method", default="ptn", help="a registered method (default: ptn search)")
    forget.add_argument("--importance", help="an importance store from `unlearn importance`")
    forget.add_argument("--alpha", type=_number_list)
    forget.add_argument("--lambda", dest="lam", type=_number_list)
    forget.add_argument("--rho", type=float, help="poison requests: target = rho x original forget accuracy")
    forget.add_argument("--param", type=_parse_param, action="append", help="KEY=VALUE method parameter")
    forget.add_argument("--mode", default="per_sample", choices=["per_sample", "batch"])
    forget.add_argument("--batch-size", type=int, default=64)
    forget.add_argument("--seed", type=int, default=0)
    forget.add_argument("--search", required=search_required, metavar="CONFIG",
                        help="a tune_configs/*.yaml search (PTN or TPE) run on Ray Tune")
    forget.add_argument("--model-name", help="registered model name in MLflow (default: ARCH-DATA)")
    forget.add_argument("--no-track", action="store_true", help="do not record the request in MLflow")
    forget.add_argument("--compare-retrain", action="store_true", help="also retrain from scratch, for comparison")
    forget.set_defaults(func=cmd_forget)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as error:
        print(f"unlearn {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"unlearn {args.command}: interrupted; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
