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

from pipelines.ray_session import DEFAULT_RAY_MIN_ROWS
from unlearning.errors import UserError


def _number(text: str) -> float:
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
    from pipelines.request import random_reference

    reference = random_reference(model, args.seed) if args.zrf and forget else None
    metrics = evaluate_model(model, dataset, forget, model.amnesis_meta.get("normalize"), random_model=reference)
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
    if args.workers < 1:
        raise UserError(f"--workers must be at least 1, got {args.workers}")
    if args.ray_min_rows < 0:
        raise UserError(f"--ray-min-rows must be 0 or more, got {args.ray_min_rows}")
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
        zrf=args.zrf,
        workers=args.workers,
        ray_min_rows=args.ray_min_rows,
        show_progress=not args.quiet,
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


# ------------------------------------------------------------------ ui


def cmd_ui(args) -> int:
    """MLflow's own UI on the store every command writes to."""
    from pipelines.tracking import tracking_uri

    uri = tracking_uri()
    print(f"MLflow UI for {uri} at http://{args.host}:{args.port} (Ctrl-C to stop)", flush=True)
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
               "--host", args.host, "--port", str(args.port)]
    os.execv(sys.executable, command)
    return 0  # not reached


# ------------------------------------------------------------------ demo


def cmd_demo(args) -> int:
    from pipelines.demo import run_demo

    run_demo(args.root, quiet=args.quiet)
    return 0


# ------------------------------------------------------------------ requests (the ledger)


def _read_ids(args) -> list[int]:
    from pathlib import Path

    from unlearning.data import read_id_file

    ids: list[int] = []
    if args.ids:
        for part in args.ids.replace(",", " ").split():
            try:
                ids.append(int(part))
            except ValueError:
                raise UserError(f"--ids: {part!r} is not an integer id") from None
    if args.file:
        ids.extend(read_id_file(Path(args.file)).tolist())
    if not ids:
        raise UserError("a deletion request needs ids: give --ids 1,2,3 or --file IDS")
    return ids


def cmd_requests(args) -> int:
    from pipelines.ledger import Busy, Ledger, process_pending

    ledger = Ledger(args.ledger)
    if args.action == "add":
        number = ledger.add(_read_ids(args), requester=args.requester or "", reason=args.reason or "")
        print(f"request {number} added ({ledger.get(number)['ids'].__len__()} ids, pending)")
    elif args.action == "list":
        rows = ledger.list(args.status)
        if args.json:
            print(json.dumps(rows, indent=2))
            return 0
        print(f"{'id':>5}  {'status':<10} {'ids':>6}  {'version':>7}  {'created':<25} requester: reason")
        for row in rows:
            print(f"{row['id']:>5}  {row['status']:<10} {len(row['ids']):>6}  {row['model_version'] or '-':>7}  "
                  f"{row['created_at']:<25} {row['requester'] or '-'}: {row['reason'] or '-'}")
    elif args.action == "show":
        row = ledger.get(args.request_id)
        batch = ledger.batch(row["batch_id"]) if row["batch_id"] else {}
        print(json.dumps({**row, "batch": batch}, indent=2))
    else:
        from pipelines.request import ForgetOptions

        options = ForgetOptions(importance_store=args.importance, search=args.search, method=args.method,
                                seed=args.seed)
        try:
            summary = process_pending(ledger, args.model_name, args.data, args.out_root, args.initial_model, options)
        except Busy as busy:
            print(f"nothing to do: {busy}")
            return 0
        if summary["batch"] is None:
            print("nothing to do: no pending requests")
        else:
            print(f"batch {summary['batch']}: {summary['processed']} requests done -> "
                  f"{args.model_name} version {summary['model_version']}"
                  + (" (resumed)" if summary.get("resumed") else ""))
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
    evaluate.add_argument("--zrf", action="store_true", help="also report ZRF against a random network")
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

    requests = commands.add_parser("requests", help="the deletion-request ledger (add, list, show, process)")
    actions = requests.add_subparsers(dest="action", required=True, metavar="ACTION")
    add = actions.add_parser("add", help="queue a deletion request")
    add.add_argument("--ids", help="comma- or space-separated sample ids")
    add.add_argument("--file", help="a text file of ids or a Parquet file with an id column")
    add.add_argument("--reason", help="why (e.g. 'GDPR art. 17 request #123')")
    add.add_argument("--requester", help="who asked")
    listing = actions.add_parser("list", help="requests, oldest first")
    listing.add_argument("--status", choices=["pending", "processing", "done", "rejected"])
    listing.add_argument("--json", action="store_true")
    show = actions.add_parser("show", help="one request with its batch")
    show.add_argument("request_id", type=int)
    process = actions.add_parser("process", help="the scheduled job: unlearn all pending requests at once")
    process.add_argument("--model-name", required=True, help="registered model to update (its @current version)")
    process.add_argument("--data", required=True)
    process.add_argument("--initial-model", help="checkpoint to start from if the model is not registered yet")
    process.add_argument("--importance", help="importance store of the original model")
    process.add_argument("--search", metavar="CONFIG", help="search on Ray Tune instead of the default method")
    process.add_argument("--method", default="ptn")
    process.add_argument("--seed", type=int, default=0)
    process.add_argument("--out-root", default="runs/requests", help="where batch run directories go")
    for sub in (add, listing, show, process):
        sub.add_argument("--ledger", help="SQLAlchemy URL (default: AMNESIS_LEDGER_URL or sqlite:///requests.db)")
    requests.set_defaults(func=cmd_requests)

    ui = commands.add_parser("ui", help="browse runs and model versions in MLflow's UI")
    ui.add_argument("--host", default="127.0.0.1")
    ui.add_argument("--port", type=int, default=5000)
    ui.set_defaults(func=cmd_ui)

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
    forget.add_argument("--alpha", type=_number)
    forget.add_argument("--lambda", dest="lam", type=_number)
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
    forget.add_argument("--workers", type=int, default=2, help="Ray workers for a large split's importance (default 2)")
    forget.add_argument("--ray-min-rows", type=int, default=DEFAULT_RAY_MIN_ROWS, metavar="N",
                        help=f"compute the importance of a split (forget set, data) with at least N rows on Ray; "
                             f"smaller ones run in this process (default {DEFAULT_RAY_MIN_ROWS})")
    forget.add_argument("--zrf", action="store_true", help="also report ZRF (similarity to a random network on D_f)")
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
