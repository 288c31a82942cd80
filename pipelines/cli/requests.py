"""`unlearn requests add|list|show|reject|process`: the deletion-request ledger."""

from __future__ import annotations

import json
import sys
from datetime import datetime
from pathlib import Path

from pipelines.cli.common import METHODS_HELP, method_listing
from unlearning.errors import UserError


def add_commands(commands) -> None:
    requests = commands.add_parser("requests", help="the deletion-request ledger (add, list, show, reject, process)")
    actions = requests.add_subparsers(dest="action", required=True, metavar="ACTION")
    add = actions.add_parser("add", help="queue a deletion request")
    add.add_argument("--ids", help="comma- or space-separated sample ids")
    add.add_argument("--file", help="a text file of ids or a Parquet file with an id column")
    add.add_argument("--reason", help="why (e.g. 'GDPR art. 17 request #123')")
    add.add_argument("--requester", help="who asked")
    listing = actions.add_parser("list", help="requests, oldest first")
    listing.add_argument("--status", choices=["pending", "processing", "done", "rejected", "failed"],
                         help="only these")
    listing.add_argument("--json", action="store_true", help="print JSON")
    show = actions.add_parser("show", help="one request with its batch")
    show.add_argument("request_id", type=int, help="the request's number")
    reject = actions.add_parser("reject", help="refuse (or cancel) a pending request, with the reason")
    reject.add_argument("request_id", type=int, help="the request's number")
    reject.add_argument("--reason", required=True, help="why it will not be carried out (kept in the ledger)")
    process = actions.add_parser("process", help="the scheduled job: unlearn all pending requests at once",
                                 **method_listing())
    process.add_argument("--model-name", required=True, help="registered model to update (its @current version)")
    process.add_argument("--data", required=True, help="the training data (as for train)")
    process.add_argument("--initial-model", help="checkpoint to start from if the model is not registered yet")
    process.add_argument("--importance", help="importance store of the original model")
    process.add_argument("--search", metavar="CONFIG", help="a search by name (ptn, potion, tpe: tune_configs/) or YAML file instead of the default method")
    process.add_argument("--method", default="ptn", help=METHODS_HELP)
    process.add_argument("--seed", type=int, default=0, help="seed of the methods")
    process.add_argument("--out-root", default="runs/requests", help="where batch run directories go")
    process.add_argument("--accept-unmet", action="store_true",
                         help="mark a batch done and move @current even if its version misses the forget-accuracy "
                              "target (without it the version is registered, its requests fail, exit status 3)")
    for sub in (add, listing, show, reject, process):
        sub.add_argument("--ledger", help="a SQLite or PostgreSQL URL (default: AMNESIS_LEDGER_URL or sqlite:///requests.db)")
    requests.set_defaults(func=cmd_requests)


def cmd_requests(args) -> int:
    from pipelines.ledger import Ledger

    ledger = Ledger(args.ledger)
    action = {"add": _add, "list": _list, "show": _show, "reject": _reject, "process": _process}[args.action]
    return action(ledger, args)


def _add(ledger, args) -> int:
    number = ledger.add(_read_ids(args), requester=args.requester or "", reason=args.reason or "")
    print(f"request {number} added ({len(ledger.get(number)['ids'])} ids, pending)")
    return 0


def _read_ids(args) -> list[int]:
    from unlearning.data import parse_id, read_id_file

    ids: list[int] = []
    if args.ids:
        ids.extend(parse_id(part, "--ids") for part in args.ids.replace(",", " ").split())
    if args.file:
        ids.extend(read_id_file(Path(args.file)).tolist())
    if not ids:
        raise UserError("a deletion request needs ids: give --ids 1,2,3 or --file IDS")
    return ids


def _list(ledger, args) -> int:
    rows = ledger.list(args.status)
    if args.json:
        print(json.dumps(rows, indent=2, default=_iso))
        return 0
    print(f"{'id':>5}  {'status':<10} {'ids':>6}  {'version':>7}  {'created':<25} requester: reason [note]")
    for row in rows:
        note = f" [{row['note']}]" if row["note"] else ""
        print(f"{row['id']:>5}  {row['status']:<10} {len(row['ids']):>6}  {row['model_version'] or '-':>7}  "
              f"{_iso(row['created_at']):<25} {row['requester'] or '-'}: {row['reason'] or '-'}{note}")
    return 0


def _show(ledger, args) -> int:
    row = ledger.get(args.request_id)
    batch = ledger.batch(row["batch_id"]) if row["batch_id"] else {}
    print(json.dumps({**row, "batch": batch}, indent=2, default=_iso))
    return 0


def _iso(moment: datetime) -> str:
    return moment.isoformat(timespec="seconds")


def _reject(ledger, args) -> int:
    ledger.reject(args.request_id, args.reason)
    print(f"request {args.request_id} rejected: {' '.join(args.reason.split())}")
    return 0


def _process(ledger, args) -> int:
    from pipelines.ledger import Busy, TargetNotMet
    from pipelines.ledger_jobs import process_pending
    from pipelines.options import ForgetOptions
    from pipelines.tracking import check_model_name
    from unlearning.outputs import check_output_path

    check_model_name(args.model_name)
    check_output_path(args.out_root, root=True)
    options = ForgetOptions(importance_store=args.importance, search=args.search, method=args.method,
                            seed=args.seed, accept_unmet=args.accept_unmet).check()
    try:
        summary = process_pending(ledger, args.model_name, args.data, args.out_root, args.initial_model, options)
    except Busy as busy:
        print(f"nothing to do: {busy}")
        return 0
    except TargetNotMet as unmet:  # recorded, not done: its own exit status
        print(f"unlearn requests: error: {unmet}", file=sys.stderr)
        return 3
    if summary["batch"] is None:
        print("nothing to do: no pending requests")
    else:
        print(f"batch {summary['batch']}: {summary['processed']} requests done -> "
              f"{args.model_name} version {summary['model_version']}"
              + (" (resumed)" if summary.get("resumed") else "")
              + ("" if summary.get("target_met", True) else " (target NOT met, accepted with --accept-unmet)"))
    return 0
