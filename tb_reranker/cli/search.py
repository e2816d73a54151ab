"""``tb search "text"``: two-stage search, printed as a table or JSON."""

from __future__ import annotations

import argparse

from tb_reranker.cli._common import add_client_args, client_from_args, print_json
from tb_reranker.numbers import POSITIVE_INT


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "search", help="search videos by text (broad view + TokenBinder rerank)"
    )
    parser.add_argument("text", nargs="+", help="query text(s); several are searched as one batch")
    parser.add_argument("--limit", type=POSITIVE_INT.parse, default=10, help="hits per query (10)")
    parser.add_argument("--no-rerank", action="store_true", help="broad view only")
    parser.add_argument(
        "--filter", default=None, help='Milvus scalar filter, e.g. "duration_s > 2"'
    )
    parser.add_argument("--json", action="store_true", help="print JSON")
    add_client_args(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    with client_from_args(args) as client:
        results = client.search_many(
            args.text, limit=args.limit, rerank=not args.no_rerank, filter=args.filter
        )
    if args.json:
        print_json(
            [
                {"query": text, "hits": [hit.to_dict() for hit in hits]}
                for text, hits in zip(args.text, results, strict=True)
            ]
        )
        return 0
    for text, hits in zip(args.text, results, strict=True):
        print(f"query: {text}")
        print(f"  {'rank':>4} {'broad':>5}  {'score':>7} {'broad_s':>7} {'delta':>7}  id")
        for hit in hits:
            print(
                f"  {hit.rank:>4} {hit.broad_rank:>5}  {hit.score:7.4f} {hit.broad_score:7.4f} "
                f"{hit.delta:+7.4f}  {hit.id}"
            )
        if not hits:
            print("  (no hits)")
    return 0
