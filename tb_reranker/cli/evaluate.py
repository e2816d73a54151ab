"""``tb eval`` (retrieval metrics, broad vs reranked; on long videos with moment annotations:
video R@k and moment R1@IoU, ``training.evaluate_moments``) and ``tb ablate`` (m / K / blocks /
head).

Every flag also reads ``TB_<FLAG>``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from tb_reranker.cli.train import EnvOption, add_options, parse_bool, resolve_env
from tb_reranker.errors import InvalidInputError, NotFoundError
from tb_reranker.numbers import POSITIVE_INT, SEED, THREADS

__all__ = ["register", "run_eval", "run_ablate", "EVAL_OPTIONS", "ABLATE_OPTIONS"]

EVAL_OPTIONS: tuple[EnvOption, ...] = (
    EnvOption("--checkpoint", "checkpoint", str, "TokenBinder checkpoint directory"),
    EnvOption("--data", "data", str, "dataset root (generic folder: what `tb synth` writes)"),
    EnvOption("--dataset", "dataset", str, "dataset format name", fallback="generic"),
    EnvOption("--split", "split", str, "split to evaluate", fallback="test"),
    EnvOption("--k", "eval_k", POSITIVE_INT.parse, "focused-view candidates K (the model's top_k)"),
    EnvOption(
        "--batch-size", "eval_batch_size", POSITIVE_INT.parse, "encoding batch size", fallback=64
    ),
    EnvOption(
        "--cache-dir", "cache_dir", str, "frame/feature cache directory", fallback=".tb_cache"
    ),
    EnvOption("--workers", "workers", THREADS.parse, "video decoding threads", fallback=2),
    EnvOption("--threads", "threads", THREADS.parse, "torch CPU threads (torch default)"),
    EnvOption("--device", "device", str, "auto, cpu, cuda, cuda:N", fallback="auto"),
    EnvOption(
        "--v2t-protocol",
        "v2t_protocol",
        str,
        "video→text protocol: videos (published: videos ranked, each by its best caption) or "
        "captions (the best own caption ranked among all captions)",
        choices=("videos", "captions"),
        fallback="videos",
    ),
    EnvOption(
        "--ties",
        "ties",
        str,
        "tie rule of the main numbers: pessimistic, optimistic or mean (the result also holds "
        "optimistic ties, the published rule)",
        choices=("pessimistic", "optimistic", "mean"),
        fallback="pessimistic",
    ),
    EnvOption(
        "--moments",
        "moments",
        str,
        "moment annotations (ActivityNet Captions, Charades-STA, QVHighlights) of the long videos "
        "under --data: evaluate moments (video R@k and R1@IoU, broad vs reranked); automatic "
        "when --data holds moments.json and no captions.jsonl (a `tb synth --long` folder)",
    ),
    EnvOption(
        "--segments",
        "segments",
        str,
        "moments only: how long videos are cut, shots | fixed:LEN[,OVERLAP] | none (shots)",
    ),
    EnvOption("--plot", "plot", str, "write recall@k curves (moments: metric bars) to this PNG"),
    EnvOption("--json", "json", parse_bool, "print JSON", switch=True),
    EnvOption("--no-progress", "no_progress", parse_bool, "no progress bars", switch=True),
)

ABLATE_OPTIONS: tuple[EnvOption, ...] = (
    EnvOption("--data", "data", str, "dataset root with train and test splits"),
    EnvOption("--out", "out", str, "output directory (one checkpoint folder per variant)"),
    EnvOption("--dataset", "dataset", str, "dataset format name", fallback="generic"),
    EnvOption("--init", "init", str, "base checkpoint (default: train one end to end first)"),
    EnvOption(
        "--epochs", "epochs", POSITIVE_INT.parse, "epochs per variant (frozen backbone)", fallback=3
    ),
    EnvOption(
        "--base-epochs", "base_epochs", POSITIVE_INT.parse, "epochs of the base model (preset)"
    ),
    EnvOption("--split", "split", str, "split to evaluate on", fallback="test"),
    EnvOption("--seed", "seed", SEED.parse, "random seed", fallback=0),
    EnvOption(
        "--cache-dir", "cache_dir", str, "frame/feature cache directory", fallback=".tb_cache"
    ),
    EnvOption("--device", "device", str, "auto, cpu, cuda, cuda:N", fallback="auto"),
    EnvOption("--threads", "threads", THREADS.parse, "torch CPU threads (torch default)"),
    EnvOption("--json", "json", parse_bool, "print JSON", switch=True),
    EnvOption("--no-progress", "no_progress", parse_bool, "no progress bars", switch=True),
)


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "eval",
        help="R@1/5/10, MdR, MnR: broad vs broad+focused, text→video and video→text",
    )
    add_options(parser, EVAL_OPTIONS)
    parser.set_defaults(func=run_eval)

    parser = sub.add_parser(
        "ablate",
        help="train and evaluate variants of m, K, fusion blocks and head (fast path)",
        description="One-factor-at-a-time sweep around the base model; each variant trains "
        "a fresh fusion module on frozen, cached vision features.",
    )
    add_options(parser, ABLATE_OPTIONS)
    parser.add_argument(
        "--sweep",
        action="append",
        default=None,
        metavar="NAME=V1,V2",
        help="factor values, NAME in m, k, blocks, head (repeatable; default: "
        "head=symmetric,listwise m=2,4 k=5,10 blocks=1,2) [TB_SWEEP, ';'-separated]",
    )
    parser.set_defaults(func=run_ablate)


def run_eval(args: argparse.Namespace) -> int:
    import torch

    from tb_reranker.model import load_checkpoint
    from tb_reranker.training.evaluate import evaluate, format_table, plot_recall_curves
    from tb_reranker.training.features import load_video_captions
    from tb_reranker.video.segment_plan import SegmentSpec

    resolve_env(args, EVAL_OPTIONS, required=("checkpoint", "data"))
    if not Path(args.checkpoint).is_dir():
        raise NotFoundError(f"checkpoint directory {args.checkpoint} does not exist")
    moments = args.moments or _moments_file(Path(args.data))
    if moments is None and args.segments is not None:
        raise InvalidInputError("--segments applies to moment evaluation only (--moments)")
    spec = SegmentSpec.parse(args.segments or "shots")  # a bad spec fails before the model loads
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_checkpoint(args.checkpoint, device=args.device)
    if moments is not None:
        return _run_moments(args, model, moments, spec)
    dataset = load_video_captions(args.dataset, args.data, args.split)
    result = evaluate(
        model,
        dataset,
        k=args.eval_k,
        batch_size=args.eval_batch_size,
        cache_dir=args.cache_dir,
        workers=args.workers,
        progress=not args.no_progress,
        v2t_protocol=args.v2t_protocol,
        ties=args.ties,
    )
    result["checkpoint"] = str(args.checkpoint)
    result["fingerprint"] = model.fingerprint()
    if args.plot:
        plot_recall_curves(result, args.plot, title=f"{Path(args.checkpoint).name} on {args.split}")
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{result['num_texts']} texts, {result['num_videos']} videos, K = {result['k']}")
        print(format_table(result))
    return 0


def _moments_file(data: Path) -> Path | None:
    """``data/moments.json`` when ``data`` is a long-video folder (no captions.jsonl)."""
    found = data / "moments.json"
    return found if found.is_file() and not (data / "captions.jsonl").exists() else None


def _run_moments(args: argparse.Namespace, model: Any, moments: str | Path, spec: Any) -> int:
    """``tb eval`` on long videos: segments, moments, broad vs reranked."""
    from tb_reranker.training.evaluate_moments import (
        evaluate_moments,
        format_moment_table,
        plot_moment_metrics,
    )

    result = evaluate_moments(
        model,
        args.data,
        moments,
        spec=spec,
        k=args.eval_k,
        batch_size=args.eval_batch_size,
        workers=args.workers,
        progress=not args.no_progress,
        ties=args.ties,
    )
    result["checkpoint"] = str(args.checkpoint)
    result["moments_file"] = str(moments)
    result["fingerprint"] = model.fingerprint()
    if args.plot:
        plot_moment_metrics(result, args.plot, title=f"{Path(args.checkpoint).name}: moments")
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(
            f"{result['num_queries']} captions, {result['num_videos']} videos, "
            f"K = {result['k']} segments"
        )
        print(format_moment_table(result))
    return 0


def run_ablate(args: argparse.Namespace) -> int:
    from tb_reranker.config import env
    from tb_reranker.training.ablation import ablate, format_ablation, parse_sweep

    resolve_env(args, ABLATE_OPTIONS, required=("data", "out"))
    specs = args.sweep
    if specs is None and env("SWEEP"):
        specs = [s for s in env("SWEEP", "").split(";") if s.strip()]
    sweep = parse_sweep(specs) if specs else None
    rows = ablate(
        args.data,
        args.out,
        init_checkpoint=args.init,
        sweep=sweep,
        epochs=args.epochs,
        base_epochs=args.base_epochs,
        dataset=args.dataset,
        eval_split=args.split,
        seed=args.seed,
        cache_dir=args.cache_dir,
        device=args.device,
        threads=args.threads,
        progress=not args.no_progress,
    )
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(format_ablation(rows))
    return 0
