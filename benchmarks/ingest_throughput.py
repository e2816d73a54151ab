"""Ingest throughput (videos/s) against the raw encoder's frames/s, and store bytes per video.

    python -m benchmarks.ingest_throughput [--quick] [--videos 24] [--models tiny vit-b-32]
                                           [--batch-size 8] [--workers 2]

Generates real MP4 clips with ``tb_reranker.video.synth.generate``, then for each model runs
``tb_reranker.index.ingest`` (decode with PyAV in worker threads, ``encode_frames``, LMDB store
write, Milvus Lite upsert, flush) into a fresh store and collection, and compares its frames/s
(videos/s x T) with ``model.encode_frames`` alone on already preprocessed random tensors
``[B, T, 3, H, W]`` at the same batch size B (the ceiling ingest can reach on this machine).
Store size per video: LMDB pages in use / videos, and one record's encoded size.

Models: ``tiny`` (the offline test config: D 64, T 8, 32 px) and ``vit-b-32`` (open_clip
ViT-B-32 with random weights: D 512, T 12, 224 px; nothing is downloaded).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import (
    add_common_arguments,
    configure_threads,
    emit,
    environment,
    plot_bars,
    time_calls,
)

__all__ = ["build_model", "lmdb_bytes_in_use", "measure_model", "run", "main"]

log = logging.getLogger("benchmarks.ingest_throughput")


def build_model(name: str) -> Any:
    """``tiny`` or ``vit-b-32`` (random weights, offline), eval mode on CPU."""
    from tb_reranker.model import TokenBinder, TokenBinderConfig

    if name == "tiny":
        config = TokenBinderConfig.tiny()
    elif name == "vit-b-32":
        config = TokenBinderConfig(clip_model="ViT-B-32", clip_cfg=None, pretrained=None)
    else:
        raise ValueError(f"unknown model {name!r} (tiny, vit-b-32)")
    return TokenBinder(config).eval()


def lmdb_bytes_in_use(path: Path) -> int:
    """Bytes of the LMDB pages holding data (the file itself is sparse and pre-sized)."""
    import lmdb

    env = lmdb.open(str(path), readonly=True, lock=False, subdir=path.is_dir())
    try:
        stat = env.stat()
        pages = stat["branch_pages"] + stat["leaf_pages"] + stat["overflow_pages"]
        return int(pages * stat["psize"])
    finally:
        env.close()


def raw_encoder(model: Any, batch_size: int, repeats: int, max_seconds: float) -> dict[str, Any]:
    """``encode_frames`` on preprocessed tensors: ms per batch and frames/s."""
    import torch

    frames = torch.randn(
        batch_size, model.num_frames, 3, model.image_size, model.image_size
    )  # [B, T, 3, H, W]

    def call() -> None:
        with torch.inference_mode():
            model.encode_frames(frames)

    timing = time_calls(call, warmup=1, repeats=repeats, max_seconds=max_seconds, min_repeats=2)
    seconds = timing.median_ms / 1e3
    return {
        "batch_ms_p50": round(timing.median_ms, 2),
        "frames_per_s": round(batch_size * model.num_frames / seconds, 1),
        "videos_per_s": round(batch_size / seconds, 3),
        "calls": timing.n,
    }


def measure_model(
    name: str, videos_dir: Path, workdir: Path, args: argparse.Namespace
) -> dict[str, Any]:
    """Ingest every clip of ``videos_dir`` with model ``name``; compare with the raw encoder."""
    from tb_reranker.index import VideoIndex, ingest
    from tb_reranker.stores import encode_record, open_store

    model = build_model(name)
    raw = raw_encoder(model, args.batch_size, repeats=args.raw_repeats, max_seconds=args.raw_s)
    store_dir = workdir / f"store_{name}"
    store = open_store(str(store_dir))
    index = VideoIndex(
        str(workdir / f"lite_{name}.db"),
        collection=f"bench_ingest_{name.replace('-', '_')}",
        dim=model.embed_dim,
        fingerprint=model.vision_fingerprint(),
    )
    try:
        report = ingest(
            [str(videos_dir)],
            model=model,
            index=index,
            store=store,
            batch_size=args.batch_size,
            workers=args.workers,
            progress=False,
        )
        if report.failed or report.ingested != args.videos:
            raise RuntimeError(f"ingest {name}: {report.summary()} {report.failed[:3]}")
        rows = index.count()
        record = store.get_many([report.ids[0]])[report.ids[0]]
        record_bytes = len(encode_record(record))
        tokens_bytes = int(record.tokens.nbytes)
    finally:
        store.close()
        index.close()
    in_use = lmdb_bytes_in_use(store_dir)
    ingest_fps = report.videos_per_s * model.num_frames
    return {
        "model": name,
        "embed_dim": int(model.embed_dim),
        "num_frames": int(model.num_frames),
        "image_size": int(model.image_size),
        "videos": report.ingested,
        "milvus_rows": rows,
        "ingest_s": round(report.seconds, 2),
        "ingest_videos_per_s": round(report.videos_per_s, 3),
        "ingest_frames_per_s": round(ingest_fps, 1),
        "raw_encoder": raw,
        "ratio_vs_raw": round(ingest_fps / raw["frames_per_s"], 3),
        "store_bytes_per_video": round(in_use / report.ingested),
        "record_bytes": record_bytes,
        "tokens_bytes": tokens_bytes,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    from tb_reranker.video.synth import generate

    configure_threads(args.threads)
    started = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="tb_bench_ingest_"))
    try:
        t0 = time.perf_counter()
        generate(
            workdir / "synth",
            num_train=args.videos,
            num_val=0,
            num_test=0,
            seed=args.seed,
            size=args.size,
            num_frames=args.clip_frames,
            fps=8,
            progress=False,
        )
        generate_s = time.perf_counter() - t0
        videos_dir = workdir / "synth" / "videos"
        results = [measure_model(name, videos_dir, workdir, args) for name in args.models]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    report: dict[str, Any] = {
        "benchmark": "ingest_throughput",
        "config": {
            "videos": args.videos,
            "clip_size_px": args.size,
            "clip_frames": args.clip_frames,
            "batch_size": args.batch_size,
            "workers": args.workers,
            "models": args.models,
            "backend": "milvus-lite + lmdb",
            "quick": args.quick,
        },
        "target": {"ratio_vs_raw_min": 0.8},
        "generate_s": round(generate_s, 2),
        "results": results,
        "seconds": round(time.perf_counter() - started, 1),
        "environment": environment(),
    }
    if not args.no_plot and results:
        path = plot_bars(
            args.out / "ingest_throughput.png",
            [r["model"] for r in results],
            {
                "raw encode_frames": [r["raw_encoder"]["frames_per_s"] for r in results],
                "ingest (decode+encode+store+Milvus)": [r["ingest_frames_per_s"] for r in results],
            },
            title=f"Ingest vs raw encoder (batch {args.batch_size})",
            ylabel="frames/s (log)",
            logy=True,
        )
        report["plot"] = str(path)
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser)
    parser.add_argument("--videos", type=int, default=None, help="clips to generate and ingest")
    parser.add_argument(
        "--models", nargs="+", choices=("tiny", "vit-b-32"), default=None, help="models"
    )
    parser.add_argument("--batch-size", type=int, default=8, help="videos per encode call")
    parser.add_argument("--workers", type=int, default=2, help="decoding threads")
    parser.add_argument("--size", type=int, default=128, help="clip side in pixels")
    parser.add_argument("--clip-frames", type=int, default=48, help="frames per clip (8 fps)")
    parser.add_argument("--raw-repeats", type=int, default=10, help="timed raw encoder calls")
    parser.add_argument("--raw-s", type=float, default=30.0, help="time cap of the raw timing")
    args = parser.parse_args(argv)
    args.videos = args.videos or (8 if args.quick else 32)
    args.models = args.models or (["tiny"] if args.quick else ["tiny", "vit-b-32"])
    if args.quick:
        args.size, args.clip_frames, args.raw_repeats = 32, 16, 5
    if args.videos < 2 or args.videos % 2 or args.batch_size < 1 or args.workers < 1:
        parser.error("--videos must be even and >= 2; batch size and workers >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args = parse_args(argv)
    emit("ingest_throughput", run(args), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
