"""``tb info``: versions, settings and (when present) the checkpoint and collection."""

from __future__ import annotations

import argparse
import importlib.metadata as md
from pathlib import Path

from tb_reranker.cli._common import add_client_args, client_from_args, print_json


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("info", help="versions, settings, checkpoint and collection facts")
    parser.add_argument("--json", action="store_true", help="print JSON")
    add_client_args(parser)
    parser.set_defaults(func=run)


def _version(name: str) -> str | None:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def run(args: argparse.Namespace) -> int:
    client = client_from_args(args)
    settings = client.settings
    info: dict = {
        "versions": {
            name: _version(name)
            for name in (
                "tb_reranker",
                "torch",
                "open_clip_torch",
                "pymilvus",
                "milvus-lite",
                "av",
                "grpcio",
            )
        },
        "settings": settings.__dict__,
    }
    if (Path(settings.checkpoint) / "config.json").exists():
        model = client.model
        info["model"] = {
            "fingerprint": model.fingerprint(),
            "vision_fingerprint": model.vision_fingerprint(),
            "query_fingerprint": model.query_fingerprint(),
            "embed_dim": model.embed_dim,
            "num_indicators": model.num_indicators,
            "num_frames": model.num_frames,
            "top_k": model.top_k,
            "image_size": model.image_size,
        }
        try:
            info["collection"] = {"name": settings.collection, "count": client.index.count()}
        except Exception as exc:  # noqa: BLE001 - info reports, it does not fail
            info["collection"] = {"name": settings.collection, "error": str(exc)}
    client.close()
    if args.json:
        print_json(info)
    else:
        for section, values in info.items():
            print(f"{section}:")
            for key, value in values.items():
                print(f"  {key}: {value}")
    return 0
