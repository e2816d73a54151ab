"""Admin commands for the video collection: create, describe, drop, check (any Milvus URI),
and ``serve`` (a local Milvus 2.3.5 server on free ports, for development).

Shared by ``python -m milvus_setup`` and ``tb collection``. A file path is a Milvus Lite URI;
``http://host:19530`` (+ ``--token user:password``) a server. Exit status: 0 ok, 1 the check found
problems, 2 a usage/backend error (one line on stderr).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from tb_reranker.numbers import POSITIVE_INT, SECONDS, Bound

__all__ = ["add_arguments", "run", "main", "build_parser"]

ACTIONS = ("create", "describe", "drop", "check", "serve")


def add_arguments(parser: argparse.ArgumentParser, *, with_action: bool = True) -> None:
    """Add the collection arguments (defaults from ``TB_*`` variables) to ``parser``."""
    if with_action:
        parser.add_argument("action", choices=ACTIONS, help="what to do")
    parser.add_argument(
        "--uri",
        default=os.environ.get("TB_MILVUS_URI") or None,
        help="Milvus URI: a file path (Milvus Lite) or http://host:19530 [TB_MILVUS_URI; "
        "default <TB_DATA_DIR>/milvus.db]",
    )
    parser.add_argument(
        "--token",
        default=os.environ.get("TB_MILVUS_TOKEN", ""),
        help="user:password or API key [TB_MILVUS_TOKEN]",
    )
    parser.add_argument(
        "--collection",
        default=os.environ.get("TB_COLLECTION") or "tb_videos",
        help="collection name [TB_COLLECTION; default tb_videos]",
    )
    parser.add_argument(
        "--dim", type=POSITIVE_INT.parse, default=None, help="vector dimension D (create: required)"
    )
    parser.add_argument(
        "--fingerprint", default=None, help="vision fingerprint of the model to record/check"
    )
    parser.add_argument(
        "--index-type", default="HNSW", choices=("HNSW", "AUTOINDEX", "FLAT", "IVF_FLAT")
    )
    parser.add_argument(
        "--hnsw-m", type=Bound(2, 2048).parse, default=16, help="HNSW M (default 16)"
    )
    parser.add_argument(
        "--ef-construction",
        type=POSITIVE_INT.parse,
        default=200,
        help="HNSW efConstruction (default 200)",
    )
    parser.add_argument("--yes", action="store_true", help="drop without asking")
    parser.add_argument(
        "--timeout", type=SECONDS.parse, default=30.0, help="seconds per Milvus call"
    )
    if with_action:
        parser.add_argument(
            "--base-dir",
            default=None,
            help="serve: data directory kept between runs (default: a temporary one, removed)",
        )


def serve(base_dir: str | None, out: Any = None) -> int:
    """Run a local Milvus 2.3.5 server on free ports until interrupted; prints its URI."""
    import time

    from milvus_setup.launcher import LocalMilvus

    out = out or sys.stdout
    with LocalMilvus(base_dir) as server:
        print(
            json.dumps(
                {
                    "uri": server.uri,
                    "start_s": round(server.start_seconds or 0, 2),
                    "dir": str(server.base_dir),
                }
            ),
            file=out,
            flush=True,
        )
        try:
            while server.running:
                time.sleep(1)
        except KeyboardInterrupt:
            pass
    return 0


def _uri(args: argparse.Namespace) -> str:
    if args.uri:
        return str(args.uri)
    from tb_reranker.config import Settings

    return Settings.from_env().milvus_uri


def _interactive() -> bool:
    """Whether stdin is a terminal someone can confirm on (a pipe, a file, /dev/null or a
    closed stdin is not: destructive actions then need --yes)."""
    try:
        return sys.stdin is not None and sys.stdin.isatty()
    except (ValueError, OSError):  # closed
        return False


def run(action: str, args: argparse.Namespace, out: Any = None) -> int:
    """Run ``action``; raises ``TBError`` subclasses for user/backend errors."""
    from tb_reranker.errors import InvalidInputError
    from tb_reranker.index import schema
    from tb_reranker.index.milvus_index import VideoIndex

    out = out or sys.stdout
    if action == "drop" and not args.yes and not _interactive():
        raise InvalidInputError(
            f"refusing to drop collection {args.collection!r} without --yes: stdin is not a "
            "terminal to confirm on"
        )
    index = VideoIndex(
        _uri(args),
        token=args.token,
        collection=args.collection,
        dim=args.dim,
        fingerprint=args.fingerprint,
        timeout=args.timeout,
        index=schema.IndexConfig(
            index_type=args.index_type, m=args.hnsw_m, ef_construction=args.ef_construction
        ),
        allow_fingerprint_mismatch=action in ("describe", "check", "drop"),
    )
    try:
        if action == "create":
            if args.dim is None:
                raise InvalidInputError("create needs --dim (the model's embedding size)")
            created = index.create(exist_ok=True)
            print(
                json.dumps({"collection": args.collection, "created": created, "uri": index.uri}),
                file=out,
            )
            return 0
        if action == "describe":
            if not index.exists():
                from tb_reranker.errors import NotFoundError

                raise NotFoundError(
                    f"collection {args.collection!r} does not exist at {index.where}"
                )
            print(json.dumps(index.describe(), indent=2, default=str), file=out)
            return 0
        if action == "drop":
            if not args.yes:  # on a terminal (_interactive): ask
                answer = input(f"drop collection {args.collection!r} at {index.where}? [y/N] ")
                if answer.strip().lower() not in ("y", "yes"):
                    print("not dropped", file=out)
                    return 1
            dropped = index.drop()
            print(json.dumps({"collection": args.collection, "dropped": dropped}), file=out)
            return 0
        if action == "check":
            if not index.exists():
                from tb_reranker.errors import NotFoundError

                raise NotFoundError(
                    f"collection {args.collection!r} does not exist at {index.where}"
                )
            problems = index._call(
                "check",
                schema.check_collection,
                index.client,
                args.collection,
                dim=args.dim,
                fingerprint=args.fingerprint,
            )
            print(
                json.dumps(
                    {"collection": args.collection, "ok": not problems, "problems": problems}
                ),
                file=out,
            )
            return 0 if not problems else 1
        raise InvalidInputError(f"unknown action {action!r}")
    finally:
        index.close()


def build_parser() -> argparse.ArgumentParser:
    from tb_reranker.cli._common import OneLineParser

    parser = OneLineParser(
        prog="python -m milvus_setup",
        description="Create, describe, drop or check the tb_reranker collection.",
    )
    add_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    import logging

    from tb_reranker.errors import TBError

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.action == "serve":
        return serve(args.base_dir)
    try:
        return run(args.action, args)
    except TBError as exc:
        print(f"milvus_setup {args.action}: error: {exc}", file=sys.stderr)
        return 2
