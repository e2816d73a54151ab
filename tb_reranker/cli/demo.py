"""``tb demo``: the main job on the embedded default (see ``tb_reranker.demo``)."""

from __future__ import annotations

import argparse

from tb_reranker.cli._common import print_json
from tb_reranker.config import env
from tb_reranker.numbers import POSITIVE_INT, SEED


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "demo", help="synthetic library → train → ingest (Milvus Lite) → search, offline"
    )
    parser.add_argument(
        "--data-dir", default=env("DEMO_DIR", "./tb_data/demo"), help="where the demo writes"
    )
    parser.add_argument("--seed", type=SEED.parse, default=env("SEED", "0"), help="seed (0)")
    parser.add_argument(
        "--train", type=POSITIVE_INT.parse, default=3000, help="synthetic training clips"
    )
    parser.add_argument("--test", type=POSITIVE_INT.parse, default=500, help="synthetic test clips")
    parser.add_argument("--epochs", type=POSITIVE_INT.parse, default=None, help="training epochs")
    parser.add_argument("--json", action="store_true", help="also print the figures as JSON")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(func=run, quiet_logs=True)


def run(args: argparse.Namespace) -> int:
    from tb_reranker.demo import DemoConfig, run_demo

    figures = run_demo(
        DemoConfig(
            data_dir=args.data_dir,
            seed=args.seed,
            num_train=args.train,
            num_test=args.test,
            epochs=args.epochs,
            progress=not args.no_progress,
        )
    )
    if args.json:
        print_json(figures)
    return 0
