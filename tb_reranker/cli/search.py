"""``tb search "text"``: two-stage search, printed as a table or JSON."""

from __future__ import annotations

import argparse

from tb_reranker.cli._common import add_client_args, client_from_args, print_json
from tb_reranker.numbers import POSITIVE_INT, Bound
from tb_reranker.requests import DEFAULT_MOMENTS_PER_VIDEO, MAX_MOMENTS_PER_VIDEO

MOMENTS_PER_VIDEO = Bound(1, MAX_MOMENTS_PER_VIDEO)

_FILTER_HELP = (
    'Milvus filter over the row fields, e.g. "duration_s > 2"; '
    "'video_id == \"clip01\"' searches inside one video (its moments: add --moments)"
)


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "search",
        help="search videos by text (broad view + TokenBinder rerank)",
        description=(
            "Each hit is a video, ranked by its best moment (segment), with that moment's span "
            "and its best moments; --moments lists moments instead. " + _FILTER_HELP + "."
        ),
    )
    parser.add_argument("text", nargs="+", help="query text(s); several are searched as one batch")
    parser.add_argument(
        "--limit", type=POSITIVE_INT.parse, default=10, help="hits per query: videos, or moments"
    )
    parser.add_argument("--no-rerank", action="store_true", help="broad view only")
    parser.add_argument("--filter", default=None, help=_FILTER_HELP)
    parser.add_argument(
        "--moments",
        action="store_true",
        help="moments as hits (--limit counts moments; the id is the moment's video)",
    )
    parser.add_argument(
        "--moments-per-video",
        type=MOMENTS_PER_VIDEO.parse,
        default=DEFAULT_MOMENTS_PER_VIDEO,
        help=f"scored moments each video hit carries ({DEFAULT_MOMENTS_PER_VIDEO}, "
        f"at most {MAX_MOMENTS_PER_VIDEO})",
    )
    parser.add_argument("--json", action="store_true", help="print JSON")
    add_client_args(parser)
    parser.set_defaults(func=run)


def _span(start: float | None, end: float | None) -> str:
    if start is None or end is None:
        return "-"
    return f"{start:.1f}-{end:.1f}s"


def run(args: argparse.Namespace) -> int:
    with client_from_args(args) as client:
        results = client.search_many(
            args.text,
            limit=args.limit,
            rerank=not args.no_rerank,
            filter=args.filter,
            group="moment" if args.moments else "video",
            moments_per_video=args.moments_per_video,
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
        header = (
            f"{'rank':>4} {'broad':>5}  {'score':>7} {'broad_s':>7} {'delta':>7}  {'moment':>13}"
        )
        print(f"  {header}  id")
        for hit in hits:
            print(
                f"  {hit.rank:>4} {hit.broad_rank:>5}  {hit.score:7.4f} {hit.broad_score:7.4f} "
                f"{hit.delta:+7.4f}  {_span(hit.start_s, hit.end_s):>13}  {hit.id}"
            )
        if not hits:
            print("  (no hits)")
    return 0
