"""`unlearn importance`: build an importance store (on Ray for large data)."""

from __future__ import annotations

from pipelines.cli.common import positive_int
from pipelines.ray_session import DEFAULT_RAY_MIN_ROWS
from unlearning.importance import KINDS, MODES


def add_commands(commands) -> None:
    parser = commands.add_parser("importance", help="build an importance store (on Ray for large data)")
    parser.add_argument("--model", required=True, help="model checkpoint directory")
    parser.add_argument("--data", required=True,
                        help="digits, a Parquet file, a train/test directory, or an image folder")
    parser.add_argument("--out", required=True, help="importance store directory to create")
    parser.add_argument("--workers", type=int,
                        help="Ray Train workers (default 2, or one per GPU/CPU if the cluster has fewer)")
    parser.add_argument("--kind", choices=KINDS, default="fisher", help="importance kind (default fisher)")
    parser.add_argument("--mode", choices=MODES, default="per_sample",
                        help="per_sample (exact) or batch (the papers')")
    parser.add_argument("--batch-size", type=positive_int, default=64, help="batch size (default 64)")
    parser.add_argument("--ray-min-rows", type=int, default=DEFAULT_RAY_MIN_ROWS, metavar="N",
                        help=f"run on Ray when the training split has at least N rows, 0 = always "
                             f"(default {DEFAULT_RAY_MIN_ROWS}); smaller data runs in this process")
    parser.add_argument("--device", help="device for in-process work (default: cuda if available, else cpu)")
    parser.add_argument("--storage", help="Ray Train storage every node reaches: a shared directory or "
                                          "an object-store URI (default: AMNESIS_RAY_STORAGE, else a temporary "
                                          "local directory, enough on one node)")
    parser.set_defaults(func=cmd_importance)


def cmd_importance(args) -> int:
    """Build the store, print one summary line; UserError on bad input."""
    from pipelines.distributed import build_importance_store
    from pipelines.options import check_device
    from pipelines.ray_session import check_workers, set_storage
    from pipelines.train import store_summary
    from unlearning.outputs import check_output_path

    check_output_path(args.out)
    check_workers(args.workers)
    set_storage(args.storage)
    meta = build_importance_store(
        args.model, args.data, args.out, workers=args.workers, kind=args.kind, mode=args.mode,
        batch_size=args.batch_size, progress=not args.quiet, min_rows=args.ray_min_rows,
        device=check_device(args.device),
    )
    print(store_summary(meta, args.out))
    return 0
