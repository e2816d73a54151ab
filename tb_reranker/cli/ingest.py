"""``tb ingest PATH...``: decode, encode and index videos (files, directories, globs, @lists), long
ones as one row per segment (``--segment``)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from tb_reranker.cli._common import add_client_args, client_from_args, print_json
from tb_reranker.errors import InvalidInputError, NotFoundError, printable
from tb_reranker.numbers import CPUS, POSITIVE_INT, THREADS

__all__ = ["register", "run"]


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "ingest",
        help="add videos to the index (idempotent: unchanged files are skipped)",
        description="Decode T frames per video, encode them with the TokenBinder model, write the "
        "frame tokens to the store and the video vector to Milvus. Inputs: files, directories "
        "(recursive), glob patterns, or @list.txt (one input per line).",
    )
    parser.add_argument("paths", nargs="+", help="video files, directories, globs or @list.txt")
    parser.add_argument(
        "--batch-size", type=POSITIVE_INT.parse, default=8, help="videos per encoder batch (8)"
    )
    parser.add_argument("--workers", type=THREADS.parse, default=2, help="decoding threads (2)")
    parser.add_argument(
        "--metadata",
        default=None,
        help='JSON file {"<video id>": {"field": value, ...}, ...}: user fields stored with each '
        "video (filterable in search)",
    )
    parser.add_argument(
        "--ids",
        default=None,
        help='JSON file {"<path>": "<video id>", ...} (default id: the file name without extension)',
    )
    parser.add_argument(
        "--segment",
        default="shots",
        metavar="SPEC",
        help="how long videos are cut into moments, one Milvus row each: 'shots' (default: shot "
        "cuts, segments of 2-30 s), 'fixed:LEN[,OVERLAP]' (windows, seconds) or 'none' (whole "
        "files); videos no longer than the longest segment stay whole",
    )
    _add_scale_arguments(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    add_client_args(parser)
    parser.set_defaults(func=run)


def _add_scale_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ingest beyond one process: ``--engine ray`` and ``--bulk``."""
    parser.add_argument(
        "--engine",
        choices=("local", "ray"),
        default="local",
        help="where decode and encode run: 'local' (default: this process) or 'ray' (decode "
        "tasks and encode actors on Ray Data; needs the ray extra); writes are this process's",
    )
    parser.add_argument(
        "--ray-address",
        default=None,
        metavar="ADDRESS",
        help="--engine ray: the cluster to join ('auto', HOST:PORT or ray://HOST:10001); "
        "default: a private local Ray runtime for this run",
    )
    parser.add_argument(
        "--encode-actors",
        type=POSITIVE_INT.parse,
        default=1,
        help="--engine ray: encoder actors, one model each (one GPU each when there are GPUs) (1)",
    )
    parser.add_argument(
        "--decode-tasks",
        type=POSITIVE_INT.parse,
        default=None,
        help="--engine ray: decode tasks at once (default: as many as the CPUs allow)",
    )
    parser.add_argument(
        "--decode-cpus",
        type=CPUS.parse,
        default=1.0,
        help="--engine ray: CPUs each decode task reserves; 0.5 packs two per core (1)",
    )
    parser.add_argument(
        "--bulk",
        action="store_true",
        help="write the Milvus rows by Milvus's bulk import at the end of the run instead of "
        "upserts (backfills into a Milvus server; not Milvus Lite)",
    )
    parser.add_argument(
        "--bulk-staging",
        default=None,
        metavar="LOCATION",
        help="--bulk: where the import files go: a directory the Milvus server reads (local "
        "storage) or s3://<Milvus's own bucket>/<prefix> [TB_BULK_STAGING]",
    )


def _read_json_object(path: str, what: str) -> dict[str, Any]:
    file = Path(path)
    if not file.is_file():
        raise NotFoundError(f"{what} file {path} does not exist")
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise InvalidInputError(f"{what} file {path} is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise InvalidInputError(f"{what} file {path} must hold a JSON object")
    return value


def run(args: argparse.Namespace) -> int:
    from tb_reranker.video.segment_plan import SegmentSpec

    options: dict[str, Any] = {
        "segment": SegmentSpec.parse(args.segment),  # a bad spec: one line, exit 2
        "batch_size": args.batch_size,
        "workers": args.workers,
        "progress": not args.no_progress,  # a bar on a terminal, log lines elsewhere
    }
    if args.engine == "ray":
        options.update(
            engine="ray",
            ray_address=args.ray_address,
            encode_actors=args.encode_actors,
            decode_tasks=args.decode_tasks,
            decode_cpus=args.decode_cpus,
        )
    elif args.ray_address is not None:
        raise InvalidInputError("--ray-address needs --engine ray")
    if args.bulk:
        options.update(bulk=True, bulk_staging=args.bulk_staging)
    elif args.bulk_staging is not None:
        raise InvalidInputError("--bulk-staging needs --bulk")
    if args.metadata:
        options["metadata"] = _read_json_object(args.metadata, "metadata")
    if args.ids:
        options["ids"] = _read_json_object(args.ids, "ids")
    with client_from_args(args) as client:
        report = client.ingest(args.paths, **options)
    if args.json:
        print_json(report.to_dict())
    else:
        print(report.summary())
        for path, reason in report.failed:
            print(f"  failed: {printable(path)}: {reason}")
    return 0 if not report.failed else 1
