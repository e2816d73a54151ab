"""``tb collection create|describe|drop|check-schema``, ``tb delete ID...``, ``tb check [--repair]``,
``tb migrate``."""

from __future__ import annotations

import argparse
from typing import Any

from tb_reranker.cli._common import add_client_args, client_from_args, print_json
from tb_reranker.errors import InvalidInputError
from tb_reranker.numbers import POSITIVE_INT

__all__ = ["register"]


def register(sub: argparse._SubParsersAction) -> None:
    collection = sub.add_parser(
        "collection",
        help="create, describe, drop or check the Milvus collection",
        description="Admin of the video collection on any Milvus URI (file path = Milvus Lite, "
        "http://host:19530 = server). The same as `python -m milvus_setup`.",
    )
    collection.add_argument("action", choices=("create", "describe", "drop", "check-schema"))
    collection.add_argument(
        "--dim",
        type=POSITIVE_INT.parse,
        default=None,
        help="vector dim (default: the checkpoint's)",
    )
    collection.add_argument(
        "--fingerprint",
        default=None,
        help="vision fingerprint of the model that fills it (default: the checkpoint's)",
    )
    collection.add_argument("--yes", action="store_true", help="drop without asking")
    add_client_args(collection)
    collection.set_defaults(func=run_collection)

    delete = sub.add_parser("delete", help="delete videos from the index and the frame-token store")
    delete.add_argument("ids", nargs="+", help="video ids")
    delete.add_argument("--json", action="store_true", help="print JSON")
    add_client_args(delete)
    delete.set_defaults(func=run_delete)

    check = sub.add_parser(
        "check", help="find (and --repair) disagreements between the index and the store"
    )
    check.add_argument("--repair", action="store_true", help="fix what was found")
    check.add_argument(
        "--store-only",
        choices=("reindex", "delete"),
        default="reindex",
        help="repair of store entries without a Milvus row: re-index them from their tokens "
        "(default) or delete them",
    )
    check.add_argument("--json", action="store_true", help="print JSON")
    add_client_args(check)
    check.set_defaults(func=run_check)

    migrate = sub.add_parser(
        "migrate",
        help="record the vision fingerprint on a collection and store written before it existed",
        description="Collections and stores written before the identity was split carry the "
        "whole-model fingerprint, so only that exact checkpoint may serve them. Given that "
        "checkpoint (--checkpoint), `tb migrate` verifies it filled them and records its vision "
        "fingerprint instead (no video is decoded or encoded); then any checkpoint with the same "
        "vision side (e.g. trained with --freeze-backbone from it) serves them as they are. "
        "Idempotent; another checkpoint is refused and nothing is written.",
    )
    migrate.add_argument("--json", action="store_true", help="print JSON")
    add_client_args(migrate)
    migrate.set_defaults(func=run_migrate)


def _settings(args: argparse.Namespace) -> Any:
    from tb_reranker.config import Settings

    return Settings.from_env(
        data_dir=args.data_dir,
        milvus_uri=args.uri,
        milvus_token=args.token,
        collection=args.collection,
        store=args.store,
        checkpoint=args.checkpoint,
    )


def _model_facts(settings: Any, args: argparse.Namespace) -> tuple[int | None, str | None]:
    """dim and (vision) fingerprint from the flags, else from the checkpoint when one exists."""
    dim, fingerprint = args.dim, args.fingerprint
    if dim is None or fingerprint is None:
        from pathlib import Path

        if (Path(settings.checkpoint) / "config.json").exists():
            from tb_reranker.model import load_checkpoint

            model = load_checkpoint(settings.checkpoint, device="cpu")
            dim = model.embed_dim if dim is None else dim
            fingerprint = model.vision_fingerprint() if fingerprint is None else fingerprint
    return dim, fingerprint


def run_collection(args: argparse.Namespace) -> int:
    from milvus_setup.cli import run

    settings = _settings(args)
    dim, fingerprint = (args.dim, args.fingerprint)
    if args.action in ("create", "check-schema"):
        dim, fingerprint = _model_facts(settings, args)
    if args.action == "create" and dim is None:
        raise InvalidInputError("pass --dim (or a --checkpoint to read it from)")
    namespace = argparse.Namespace(
        uri=settings.milvus_uri,
        token=settings.milvus_token,
        collection=settings.collection,
        dim=dim,
        fingerprint=fingerprint,
        index_type="HNSW",
        hnsw_m=16,
        ef_construction=200,
        yes=args.yes,
        timeout=settings.timeout,
    )
    action = "check" if args.action == "check-schema" else args.action
    return run(action, namespace)


def run_delete(args: argparse.Namespace) -> int:
    """Exit 0 when every id was deleted, 1 when some were not found (the others are deleted),
    2 (NotFoundError) when none was found."""
    from tb_reranker.errors import NotFoundError

    with client_from_args(args) as client:
        report = client.delete_report(args.ids)
    if report.not_found and not report.deleted:
        raise NotFoundError(
            f"no such video id{'s' if len(report.not_found) > 1 else ''}: "
            + ", ".join(report.not_found[:10])
            + (" ..." if len(report.not_found) > 10 else "")
            + " (nothing deleted)"
        )
    if args.json:
        print_json(report.to_dict())
    else:
        print(f"deleted {len(report.deleted)} video(s)")
        if report.not_found:
            print("not found: " + ", ".join(report.not_found))
    return 1 if report.not_found else 0


def run_check(args: argparse.Namespace) -> int:
    from tb_reranker.index import check

    with client_from_args(args) as client:
        report = check(
            client.index,
            client.store,
            repair=args.repair,
            model=client.model,
            store_only=args.store_only,
        )
    if args.json:
        print_json(report.to_dict())
    else:
        print(f"fingerprint ok: {report.fingerprint_ok}")
        for name in ("only_in_store", "only_in_index", "hash_mismatch", "corrupt", "orphans"):
            ids = getattr(report, name)
            shown = ", ".join(ids[:10]) + (" ..." if len(ids) > 10 else "")
            print(f"{name}: {len(ids)}" + (f" ({shown})" if ids else ""))
        for video_id, reason in list(report.reasons.items())[:10]:
            print(f"corrupt {video_id}: {reason}")
        for line in report.damage:
            print(f"store damage: {line}")
        for action in report.actions:
            print(f"repaired: {action}")
        for video_id, uri in report.lost.items():
            print(f"lost {video_id}: re-ingest {uri or '(source unknown)'}")
        print("OK" if report.ok or report.repaired else "disagreements found (run with --repair)")
    return 0 if report.ok or report.repaired else 1


def run_migrate(args: argparse.Namespace) -> int:
    from tb_reranker.index import VideoIndex, migrate

    with client_from_args(args) as client:
        model = client.model  # NotFoundError (exit 2) without a checkpoint
        settings = client.settings
        # bound to no model: it reads what the collection records, whatever that is
        index = VideoIndex(
            settings.milvus_uri, token=settings.milvus_token, collection=settings.collection
        )
        try:
            report = migrate(model=model, index=index, store=client.store)
        finally:
            index.close()
    if args.json:
        print_json(report.to_dict())
    elif report.changed:
        print(
            f"migrated collection {report.collection!r} (was {report.was}): vision fingerprint "
            f"{report.vision_fingerprint} recorded, {report.records_rewritten} store records "
            "rewritten; checkpoints with this vision side now serve it"
        )
    else:
        print(
            f"collection {report.collection!r} already records vision fingerprint "
            f"{report.vision_fingerprint}: nothing to do"
        )
    return 0
