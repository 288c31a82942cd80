"""`unlearn forget`, `unlearn search` and `unlearn history`: deletion requests and lineage."""

from __future__ import annotations

import json
import logging

from pipelines.cli.common import (
    METHODS_HELP,
    fraction,
    key_value,
    method_listing,
    number,
    positive_int,
)
from pipelines.ray_session import DEFAULT_RAY_MIN_ROWS
from unlearning.errors import UserError

log = logging.getLogger(__name__)


def add_commands(commands) -> None:
    forget = commands.add_parser("forget", help="process one deletion request", **method_listing())
    search = commands.add_parser("search", help="a deletion request with a parallel search on Ray (PTN) or Ray Tune (TPE)",
                                 **method_listing())
    for sub in (forget, search):
        _request_arguments(sub, search_required=sub is search)

    history = commands.add_parser("history", help="a registered model's versions and what each removed")
    history.add_argument("--model-name", required=True, help="the registered model")
    history.add_argument("--ids", action="store_true", help="also list the removed ids")
    history.add_argument("--walk", action="store_true",
                         help="also show each version's PTN walk (its run's metric history)")
    history.add_argument("--json", action="store_true", help="print JSON")
    history.set_defaults(func=cmd_history)


def _request_arguments(parser, search_required: bool) -> None:
    add = parser.add_argument
    add("--model", required=True, help="a checkpoint directory or models:/NAME@current")
    add("--data", required=True, help="the training data (as for train)")
    add("--forget", required=True, help="class:K, subclass:K, random:N[:SEED], or an id file")
    add("--out", required=True, help="run directory to create")
    add("--method", default="ptn", help=METHODS_HELP)
    add("--importance", help="an importance store from `unlearn importance`")
    add("--alpha", type=number, help="SSD's selection threshold alpha (fixed-strength methods)")
    add("--lambda", dest="lam", type=number, help="SSD's dampening constant lambda")
    add("--rho", type=fraction, help="poison requests: target = rho x original forget accuracy")
    add("--param", type=key_value, action="append", help="KEY=VALUE method parameter (repeatable)")
    add("--hypernet", metavar="DIR", help="--method hyperforget: the hypernetwork (`unlearn hyperforget train`)")
    add("--mode", default="per_sample", choices=["per_sample", "batch"], help="importance mode")
    add("--batch-size", type=positive_int, default=64, help="importance batch size (default 64)")
    add("--seed", type=int, default=0, help="seed of random:N forget sets and of the methods")
    add("--search", required=search_required, metavar="CONFIG",
        help="a search by name (ptn, potion, tpe: tune_configs/) or YAML file: PTN walked on Ray actors, TPE on Ray Tune")
    add("--model-name", help="registered model name in MLflow (default: the starting version's, else "
        "ARCH-DATA-ROOT8: ROOT8 = the first 8 hex digits of the original model's fingerprint)")
    add("--no-track", action="store_true", help="do not record the request in MLflow")
    add("--accept-unmet", action="store_true",
        help="move @current to the new version even if its forget accuracy misses the target "
             "(without it such a version is registered, @current stays, and the exit status is 3)")
    add("--compare-retrain", action="store_true", help="also retrain from scratch, for comparison")
    add("--workers", type=int, help="Ray workers for a large split's importance "
                                    "(default 2, or one per GPU/CPU if the cluster has fewer)")
    add("--ray-min-rows", type=int, default=DEFAULT_RAY_MIN_ROWS, metavar="N",
        help=f"compute the importance of a split (forget set, data) with at least N rows on Ray; "
             f"smaller ones run in this process (default {DEFAULT_RAY_MIN_ROWS})")
    add("--zrf", action="store_true", help="also report ZRF (similarity to a random network on D_f)")
    add("--storage", help="Ray Train/Tune storage every node reaches (default: AMNESIS_RAY_STORAGE, "
                          "else a temporary local directory)")
    add("--device", help="device for the work done in this process: cpu, cuda, cuda:1 "
                         "(default: cuda if available)")
    add("--inference-precision", default="fp32", choices=["fp32", "bf16"],
        help="precision of the request's forward passes (accuracies, search steps, metrics): "
             "fp32 (default) or bf16 autocast, ~2x faster where the CPU or GPU has bfloat16 units; "
             "importance is computed in fp32 either way")
    parser.set_defaults(func=cmd_forget)


def forget_options(args):
    """The request's ForgetOptions from the command line; UserError on bad combinations."""
    from pipelines.options import ForgetOptions, check_device

    params = dict(args.param or [])
    if args.alpha is not None:
        params["alpha"] = args.alpha
    if args.lam is not None:
        params["lam"] = args.lam
    if getattr(args, "hypernet", None):
        if args.method != "hyperforget":
            raise UserError(f"--hypernet is for --method hyperforget, not {args.method}")
        params["hypernet"] = args.hypernet
    if args.workers is not None and args.workers < 1:
        raise UserError(f"--workers must be at least 1, got {args.workers}")
    if args.ray_min_rows < 0:
        raise UserError(f"--ray-min-rows must be 0 or more, got {args.ray_min_rows}")
    if args.search and (params or args.method != "ptn"):
        raise UserError("--search chooses alpha and lambda itself; drop --method, --alpha, --lambda and --param")
    return ForgetOptions(
        method=args.method, params=params, importance_store=args.importance, mode=args.mode,
        batch_size=args.batch_size, seed=args.seed, rho=args.rho, search=args.search,
        track=not args.no_track, model_name=args.model_name, compare_retrain=args.compare_retrain,
        zrf=args.zrf, workers=args.workers, ray_min_rows=args.ray_min_rows, show_progress=not args.quiet,
        device=check_device(args.device), accept_unmet=args.accept_unmet,
        inference_precision=args.inference_precision,
    ).check()


def reads_importance(method: str, search: str | None) -> bool:
    """Whether the request computes importances (the SSD family and searches over it do)."""
    from unlearning.methods import METHODS, canonical_name

    found = METHODS.get(canonical_name(method))
    return bool(search) or found is None or found.fn.__module__.endswith("ssd_family")


def cmd_forget(args) -> int:
    from pipelines.progress import StepProgress
    from pipelines.ray_session import set_storage
    from pipelines.request import run_forget
    from pipelines.summary import print_report

    options = forget_options(args)
    set_storage(args.storage)
    log.info("request options: %s", options)
    if not args.importance and reads_importance(options.method, options.search):
        log.warning("no --importance store given, so the full-data importance is computed now; "
                    "`unlearn importance` once makes every later request cheaper")
    with StepProgress("search steps", disable=args.quiet) as progress:
        report = run_forget(args.model, args.data, args.forget, args.out, options, progress=progress.on_result)
    print_report(report, args.out)
    return 0 if report.target_met is not False or options.accept_unmet else 3  # 3: recorded, target missed


def cmd_history(args) -> int:
    from pipelines.lineage import history, removed_ids, walk_history
    from pipelines.tracking import check_model_name, tracking_uri

    check_model_name(args.model_name)
    rows = history(args.model_name)
    if not rows:
        raise UserError(f"model {args.model_name!r} has no versions at {tracking_uri()}")
    if args.walk:
        for row in rows:
            row["walk"] = walk_history(args.model_name, row["version"]) if row["role"] == "unlearned" else []
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'version':>7}  {'parent':>6}  {'role':<10} {'method':<8} {'removed':>7}  forget set")
    for row in rows:
        mark = (" @current" if row["current"] else "") + ("" if row["target_met"] else " (target NOT met)")
        print(
            f"{row['version']:>7}  {row['parent_version'] or '-':>6}  {row['role']:<10} {row['method'] or '-':<8} "
            f"{row['forget_size']:>7}  {row['forget_spec'] or '-'}{mark}"
        )
    if args.ids:
        for row in rows:
            if row["role"] == "unlearned":
                removed = " ".join(map(str, removed_ids(args.model_name, row["version"])))
                print(f"version {row['version']} removed: {removed}")
    for row in rows if args.walk else []:
        if row["walk"]:
            print(f"version {row['version']} walk:  step  {'alpha':>10}  {'lambda':>8}  forget acc")
            for step in row["walk"]:
                at_least = ">=" if step.get("stopped_early") else ""  # the pass stopped once past the target
                print(f"{step['step']:>19}  {step['alpha']:>10.4g}  {step['lambda']:>8.4g}  "
                      f"{at_least:>2}{100 * step['forget_acc']:>7.1f}%")
    return 0
