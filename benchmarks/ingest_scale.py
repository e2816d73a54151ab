"""Ingest on Ray against the one-process ingest, and the per-stage rates that say how it scales.

    python -m benchmarks.ingest_scale [--quick] [--videos 200] [--models tiny vit-b-32]
                                      [--vit-videos N] [--batch-size 8]

Per model, the same N synthetic clips (``tb_reranker.video.synth.generate``) ingested into a
fresh Milvus Lite collection and LMDB store, the model loaded from a checkpoint on disk as
``tb ingest`` does, by (a) ``engine="local"``, (b) ``engine="ray"`` with 1 decode task (half a
CPU) + 1 encode actor, (c) ``engine="ray"`` with 2 decode tasks (a quarter CPU each) + 1 encode
actor; the actor reserves the CPUs the decode tasks leave (1.5 of 2) and runs torch on 2
threads. Models: ``tiny`` (the offline test config: D 64, T 8, 32 px, on 32 px clips) and
``vit-b-32`` (the shape users run: open_clip ViT-B-32 with random weights, D 512, T 12, 224 px,
on 320 px clips of 24 frames; nothing is downloaded).

Each Ray run starts its own private local runtime; its end-to-end seconds include that start,
and ``startup_s`` (``IngestReport.startup_s``: runtime start, actor start + model load, the
first batch through) is reported beside it; ``steady_videos_per_s`` = (videos - the first
batch) / (seconds - startup_s) (local: its end-to-end rate, planning included). The actor may
encode more than the first batch before those rows reach the driver, so the steady rate is an
upper bound; the end-to-end rate is the measure. Ratios ray/local and local/ray, end to end (the target, >= 0.8) and steady.

Per-stage rates of the same clips in this process: decode (``decode_file`` on one thread) in
videos/s per core, encode (``encode_segments`` in batches of ``--batch-size``, this process's
torch threads) in frames/s, write (the driver's write path, ``Ingestion.take``: LMDB put + one
Milvus Lite upsert per ``--batch-size`` videos, into a fresh collection, collection creation
and the final flush excluded) in rows/s. With ``d`` decode cores and ``e`` encoders a pipeline
runs at about ``min(d x decode, e x encode / frames_per_video, write)`` videos/s.
"""

from __future__ import annotations

import argparse
import logging
import os
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
    "ray 1 decode + 1 encode": {
        "engine": "ray",
        "decode_tasks": 1,
        "decode_cpus": 0.5,
        "encode_actors": 1,
    },
    "ray 2 decode + 1 encode": {
        "engine": "ray",
        "decode_tasks": 2,
        "decode_cpus": 0.25,
        "encode_actors": 1,
    },
}
CLIPS = {  # model -> synthetic clips: frame side (px), frames (at 8 fps)
    "tiny": {"size": 32, "num_frames": 16},
    "vit-b-32": {"size": 320, "num_frames": 24},
}


def build_model(name: str) -> Any:
    """``tiny`` or ``vit-b-32`` (random weights, offline)."""
    from tb_reranker.model import TokenBinder, TokenBinderConfig

    if name == "tiny":
        return TokenBinder(TokenBinderConfig.tiny())
    return TokenBinder(TokenBinderConfig(clip_model="ViT-B-32", clip_cfg=None, pretrained=None))


def _ingest(videos: Path, checkpoint: Path, data: Path, batch: int, **settings: Any) -> Any:
    from tb_reranker.index import VideoIndex, ingest
    from tb_reranker.model import load_checkpoint
    from tb_reranker.stores import LmdbFrameStore

    model = load_checkpoint(checkpoint, device="cpu", inference=True)
    index = VideoIndex(str(data / "milvus.db"), collection="bench")
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


def _stage_rates(videos: Path, checkpoint: Path, data: Path, batch: int) -> dict[str, float]:
    """Decode videos/s on one thread, encode frames/s, write rows/s, in this process."""
    from tb_reranker.index import VideoIndex
    from tb_reranker.index.ingest import Ingestion, IngestOptions
    from tb_reranker.index.segmenting import (
        DecodeSettings,
        EncodedSegment,
        EncodedVideo,
        decode_file,
        encode_segments,
    )
    from tb_reranker.model import load_checkpoint
    from tb_reranker.stores import LmdbFrameStore
    from tb_reranker.video.segment_plan import SegmentSpec

    t0 = time.perf_counter()
    model = load_checkpoint(checkpoint, device="cpu", inference=True)
    load_s = time.perf_counter() - t0
    settings = DecodeSettings.for_model(model, SegmentSpec.parse("shots"), threads=1)
    files = sorted(str(p) for p in videos.glob("*.mp4"))
    decode_s = encode_s = 0.0
    frames = 0
    encoded: list[tuple[str, EncodedVideo]] = []
    for start in range(0, len(files), batch):  # decode a batch of files, then encode it
        t0 = time.perf_counter()
        part = [
            (f, item) for f in files[start : start + batch] for item in decode_file(f, settings)
        ]
        decode_s += time.perf_counter() - t0
        clips = [(f, item) for f, item in part if hasattr(item, "clip")]
        assert len(clips) == len(part), "a synthetic clip failed to decode"
        t0 = time.perf_counter()
        cls, tokens = encode_segments(
            model,
            np.stack([item.clip.frames for _, item in clips]),
            np.stack([item.clip.mask for _, item in clips]),
        )
        encode_s += time.perf_counter() - t0
        frames += sum(int(item.clip.num_frames) for _, item in clips)
        for b, (f, item) in enumerate(clips):
            segment = EncodedSegment.of(
                item.start_s, item.end_s, tokens[b], cls[b], item.clip.timestamps, item.clip.mask
            )
            video = EncodedVideo(f, float(item.clip.duration_s), [segment], ended=True)
            encoded.append((Path(f).stem, video))
    # write: the driver's own path (Ingestion.take -> store, then one upsert per batch)
    index = VideoIndex(str(data / "milvus.db"), collection="bench_write")
    store = LmdbFrameStore(data / "frames")
    try:
        writer = Ingestion(
            model=model, index=index, store=store, options=IngestOptions(batch_size=batch)
        )
        index.bind(
            fingerprint=writer.fingerprint,
            dim=int(model.embed_dim),
            model_fingerprint=writer.model_fingerprint,
        )
        index.create(exist_ok=True)
        writer.hashes = {video_id: "0" * 64 for video_id, _ in encoded}
        t0 = time.perf_counter()
        for video_id, video in encoded:
            writer.take(video_id, video, {})
        writer.flush()
        write_s = time.perf_counter() - t0
        rows = writer.report.segments
    finally:
        store.close()
        index.close()
    return {
        "decode_videos_per_s_per_core": round(len(files) / decode_s, 2),
        "encode_frames_per_s": round(frames / encode_s, 1),
        "write_rows_per_s": round(rows / write_s, 1),
        "frames_per_video": round(frames / max(1, len(files)), 1),
        "segments_per_video": round(len(encoded) / max(1, len(files)), 2),
        "model_load_s": round(load_s, 2),
        "encode_threads": _threads(),
    }


def _threads() -> int:
    import torch

    return int(torch.get_num_threads())


def _measure(name: str, videos: int, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from tb_reranker.model import save_checkpoint
    from tb_reranker.video.synth import generate

    torch.manual_seed(args.seed)
    save_checkpoint(build_model(name), work / "checkpoint")
    clips = CLIPS[name]
    t0 = time.perf_counter()
    generate(work / "synth", num_train=videos, num_val=0, num_test=0, seed=args.seed,
             fps=8, progress=False, **clips)  # fmt: skip
    log.info("%s: %d clips generated in %.1f s", name, videos, time.perf_counter() - t0)
    source = work / "synth" / "videos"
    results: dict[str, Any] = {}
    for config, settings in CONFIGS.items():
        report = _ingest(source, work / "checkpoint", work / config, args.batch_size, **settings)
        assert report.ingested == videos and not report.failed, report.summary()
        startup = float(report.startup_s)
        first = min(videos - 1, args.batch_size)  # one segment a clip: a batch is that many
        results[config] = {
            "seconds": round(report.seconds, 2),
            "videos_per_s": round(report.videos_per_s, 3),
            "startup_s": round(startup, 2),
            # the first batch's videos came back at startup_s: the rest over the rest
            "steady_videos_per_s": round(
                (videos - first) / (report.seconds - startup) if startup else report.videos_per_s,
                3,
            ),
        }
        log.info("%s %s: %s, startup %.1f s", name, config, report.summary(), startup)
        shutil.rmtree(work / config, ignore_errors=True)
    stages = _stage_rates(source, work / "checkpoint", work / "write", args.batch_size)
    local = results["local"]
    ratios = {
        config: {
            "ray_over_local": round(r["videos_per_s"] / local["videos_per_s"], 3),
            "local_over_ray": round(local["videos_per_s"] / r["videos_per_s"], 3),
            "steady_ray_over_local": round(
                r["steady_videos_per_s"] / local["steady_videos_per_s"], 3
            ),
        }
        for config, r in results.items()
        if config != "local"
    }
    shutil.rmtree(work / "synth", ignore_errors=True)
    return {
        "videos": videos,
        "clip_size_px": clips["size"],
        "clip_frames": clips["num_frames"],
        "results": results,
        "ratios": ratios,
        "target_met": {c: r["ray_over_local"] >= 0.8 for c, r in ratios.items()},
        "stages": stages,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    configure_threads(args.threads)
    models: dict[str, Any] = {}
    for name in args.models:
        videos = args.vit_videos if name == "vit-b-32" else args.videos
        work = Path(tempfile.mkdtemp(prefix="tb_bench_scale_"))
        try:
            models[name] = _measure(name, videos, work, args)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    report: dict[str, Any] = {
        "benchmark": "ingest_scale",
        "config": {
            "models": args.models,
            "batch_size": args.batch_size,
            "backend": "milvus-lite + lmdb",
            "engines": CONFIGS,
            "quick": args.quick,
            "load_1min_at_end": round(os.getloadavg()[0], 2),
        },
        "target": {"ray_over_local_min": 0.8},
        "models": models,
        "environment": environment(),
    }
    if not args.no_plot:
        series: dict[str, list[float]] = {}
        for name, m in models.items():
            rows = m["results"].values()
            series[f"{name} end to end"] = [r["videos_per_s"] for r in rows]
            series[f"{name} steady"] = [r["steady_videos_per_s"] for r in rows]
        path = plot_bars(
            args.out / "ingest_scale.png",
            [c.replace(" + ", "\n+ ") for c in CONFIGS],
            series,
            title="Ingest, one process vs Ray (2 cores)",
            ylabel="videos/s (log)",
            logy=True,
        )
        report["plot"] = str(path)
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser)
    parser.add_argument("--videos", type=int, default=None, help="tiny clips (200; --quick 12)")
    parser.add_argument(
        "--vit-videos", type=int, default=None, help="vit-b-32 clips (--videos; --quick 4)"
    )
    parser.add_argument(
        "--models", nargs="+", choices=tuple(CLIPS), default=None, help="models (both)"
    )
    parser.add_argument("--batch-size", type=int, default=8, help="segments per encode call")
    args = parser.parse_args(argv)
    args.videos = args.videos or (12 if args.quick else 200)
    args.vit_videos = args.vit_videos or (4 if args.quick else args.videos)
    args.models = args.models or list(CLIPS)
    if min(args.videos, args.vit_videos) < 2 or args.videos % 2 or args.vit_videos % 2:
        parser.error("--videos and --vit-videos must be even and >= 2")
    if args.batch_size < 1:
        parser.error("--batch-size must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args = parse_args(argv)
    emit("ingest_scale", run(args), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
