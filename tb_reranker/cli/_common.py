"""Options shared by the commands that talk to Milvus, the store and the reranker."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from tb_reranker.config import env

__all__ = ["OneLineParser", "add_client_args", "client_from_args", "print_json"]


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one line on stderr and exit status 2 (the
    usage itself is ``--help``'s); its subparsers are of the same kind."""

    def error(self, message: str) -> Any:  # argparse's signature says NoReturn
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def add_client_args(parser: argparse.ArgumentParser) -> None:
    """``--uri --token --collection --store --checkpoint --reranker --device`` (all ``TB_*``)."""
    group = parser.add_argument_group("where the data lives (each also TB_<NAME>)")
    group.add_argument("--data-dir", default=None, help="root of the embedded defaults (./tb_data)")
    group.add_argument("--uri", default=None, help="Milvus URI: file (Lite) or http://host:19530")
    group.add_argument("--token", default=None, help="Milvus token")
    group.add_argument("--collection", default=None, help="collection name (tb_videos)")
    group.add_argument("--store", default=None, help="frame-token store: directory or s3://...")
    group.add_argument("--checkpoint", default=None, help="TokenBinder checkpoint directory")
    group.add_argument(
        "--reranker", default=None, help="'local' or host:port of a tb serve sidecar"
    )
    group.add_argument("--device", default=None, help="auto, cpu, cuda, cuda:N")


def client_from_args(args: argparse.Namespace, **extra: Any) -> Any:
    from tb_reranker.client import Client

    return Client(
        args.uri,
        token=args.token,
        collection=args.collection,
        store=args.store,
        checkpoint=args.checkpoint,
        reranker=args.reranker,
        device=args.device,
        data_dir=args.data_dir or env("DATA_DIR"),
        **extra,
    )


def print_json(value: Any) -> None:
    json.dump(value, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")
