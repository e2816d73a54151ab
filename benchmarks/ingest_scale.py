"""Ingest on Ray against the one-process ingest, and the per-stage rates that say how it scales.

    python -m benchmarks.ingest_scale [--quick] [--videos 200] [--batch-size 8]

The same N synthetic clips (``tb_reranker.video.synth.generate``, tiny model from a checkpoint
on disk) ingested into a fresh Milvus Lite collection and LMDB store by (a) ``engine="local"``,
(b) ``engine="ray"`` with 1 decode task + 1 encode actor, (c) ``engine="ray"`` with 2 decode
tasks (half a CPU each) + 1 encode actor; each Ray run starts its own private local runtime,
and its wall time includes that start. Videos/s of each and the ratio ray/local (target >= 0.8).

Per-stage rates, measured in the same run on this process: decode (``decode_file`` of every
clip, one core) in videos/s per core, encode (``encode_segments`` on those frames, batches of
``--batch-size``) in frames/s, write (a re-index of the stored records into a fresh collection:
hashing, the rows, the upsert) in rows/s. With ``d`` decode cores and ``e`` encoders a pipeline
runs at about ``min(d x decode, e x encode / T, write)`` videos/s.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import add_common_arguments, configure_threads, emit, environment, plot_bars

__all__ = ["run", "main"]

log = logging.getLogger("benchmarks.ingest_scale")

CONFIGS = {  # name -> ingest settings
    "local": {"engine": "local"},
    "ray 1 decode + 1 encode": {"engine": "ray", "decode_tasks": 1, "encode_actors": 1},
    "ray 2 decode + 1 encode": {
        "engine": "ray",
        "decode_tasks": 2,
        "decode_cpus": 0.5,
        "encode_actors": 1,
    },
}


def _ingest(videos: Path, checkpoint: Path, data: Path, batch: int, **settings: Any) -> Any:
    from tb_reranker.index import VideoIndex, ingest
    from tb_reranker.model import load_checkpoint
    from tb_reranker.stores import LmdbFrameStore

    model = load_checkpoint(checkpoint, device="cpu", inference=True)
    index = VideoIndex(str(data / "milvus.db"), collection=settings.pop("collection", "bench"))
    store = LmdbFrameStore(data / "frames")
    try:
        return ingest(
            [str(videos)],
            model=model,
            index=index,
            store=store,
            batch_size=batch,
            progress=False,
            checkpoint=str(checkpoint),
            device="cpu",
            **settings,
        )
    finally:
        store.close()
        index.close()


def _stage_rates(videos: Path, checkpoint: Path, batch: int) -> dict[str, float]:
    """Decode videos/s on one core and encode frames/s, one after the other in this process."""
    from tb_reranker.index.segmenting import DecodeSettings, decode_file, encode_segments
    from tb_reranker.model import load_checkpoint
    from tb_reranker.video.segment_plan import SegmentSpec

    model = load_checkpoint(checkpoint, device="cpu", inference=True)
    settings = DecodeSettings.for_model(model, SegmentSpec.parse("shots"), threads=1)
    files = sorted(str(p) for p in videos.glob("*.mp4"))
    t0 = time.perf_counter()
    clips = [item.clip for f in files for item in decode_file(f, settings) if hasattr(item, "clip")]
    decode_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for start in range(0, len(clips), batch):
        part = clips[start : start + batch]
        encode_segments(model, np.stack([c.frames for c in part]), np.stack([c.mask for c in part]))
    encode_s = time.perf_counter() - t0
    frames = sum(c.num_frames for c in clips)
    return {
        "decode_videos_per_s_per_core": round(len(files) / decode_s, 2),
        "encode_frames_per_s": round(frames / encode_s, 1),
        "frames_per_video": round(frames / max(1, len(files)), 1),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from tb_reranker.model import TokenBinder, TokenBinderConfig, save_checkpoint
    from tb_reranker.video.synth import generate

    configure_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="tb_bench_scale_"))
    results: dict[str, Any] = {}
    try:
        torch.manual_seed(args.seed)
        save_checkpoint(TokenBinder(TokenBinderConfig.tiny()), work / "checkpoint")
        generate(work / "synth", num_train=args.videos, num_val=0, num_test=0, seed=args.seed,
                 progress=False)  # fmt: skip
        videos = work / "synth" / "videos"
        for name, settings in CONFIGS.items():
            report = _ingest(videos, work / "checkpoint", work / name, args.batch_size, **settings)
            assert report.ingested == args.videos and not report.failed, report.summary()
            results[name] = {"seconds": round(report.seconds, 2),
                             "videos_per_s": round(report.videos_per_s, 2)}  # fmt: skip
            log.info("%s: %s", name, report.summary())
        # write: re-index the first run's records into a fresh collection (no decode, no encode)
        again = _ingest(videos, work / "checkpoint", work / "local", args.batch_size,
                        collection="bench_rewrite")  # fmt: skip
        stages = _stage_rates(videos, work / "checkpoint", args.batch_size)
        stages["write_rows_per_s"] = round(again.segments / again.seconds, 1)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    local = results["local"]["videos_per_s"]
    ratios = {k: round(v["videos_per_s"] / local, 3) for k, v in results.items() if k != "local"}
    report: dict[str, Any] = {
        "benchmark": "ingest_scale",
        "config": {
            "videos": args.videos,
            "batch_size": args.batch_size,
            "model": "tiny",
            "backend": "milvus-lite + lmdb",
            "quick": args.quick,
        },  # fmt: skip
        "target": {"ray_over_local_min": 0.8},
        "results": results,
        "ray_over_local": ratios,
        "stages": stages,
        "environment": environment(),
    }
    if not args.no_plot:
        path = plot_bars(
            args.out / "ingest_scale.png",
            list(results),
            {"videos/s": [r["videos_per_s"] for r in results.values()]},
            title=f"Ingest of {args.videos} clips: one process vs Ray",
            ylabel="videos/s",
        )
        report["plot"] = str(path)
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser)
    parser.add_argument("--videos", type=int, default=None, help="clips (200; --quick 12)")
    parser.add_argument("--batch-size", type=int, default=8, help="segments per encode call")
    args = parser.parse_args(argv)
    args.videos = args.videos or (12 if args.quick else 200)
    if args.videos < 2 or args.videos % 2 or args.batch_size < 1:
        parser.error("--videos must be even and >= 2; --batch-size >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args = parse_args(argv)
    emit("ingest_scale", run(args), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
