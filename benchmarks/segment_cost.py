"""Cost of segmenting at decode time: shots + T frames per segment vs a plain decode.

    python -m benchmarks.segment_cost [--quick] [--minutes 10] [--fps 25] [--repeats 3]

Generates (once, cached under the temp dir) an H.264 video of ``--minutes`` at 96x96 and
``--fps``: shots of 1-20 s (seeded), each a textured colour field with a moving bar and noise, so
frames cost what small real frames cost to decode. Then times, alternately, in one process:

* ``plain``: one sequential PyAV decode of every frame, nothing else (the baseline);
* ``segment_224``: ``iter_segments(spec="shots")`` with T = 12 at 224 px (ViT-B's input): shot
  detection + 12 CLIP-preprocessed frames per segment, consumed as they come;
* ``segment_32``: the same at 32 px (the tiny test model's input), where preprocessing is cheap,
  so the ratio shows the detection and buffering overhead.

Prints JSON with the median seconds of each and the ratios to ``plain`` (issue 22's target:
``segment_224 / plain <= 1.5``), and writes it to ``--out/segment_cost.json``.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import add_common_arguments, emit, environment

__all__ = ["make_video", "plain_decode", "segment_pass", "run", "main"]

log = logging.getLogger("benchmarks.segment_cost")

SIZE = 96  # frame side in pixels


def make_video(path: Path, minutes: float, fps: int, seed: int) -> list[float]:
    """Write the benchmark video to ``path`` (if absent); returns its true cut times (s)."""
    import av
    import numpy as np

    rng = np.random.default_rng(seed)
    total = int(round(minutes * 60 * fps))
    lengths: list[int] = []
    while sum(lengths) < total:
        lengths.append(int(rng.uniform(1.0, 20.0) * fps))
    cuts = [float(c) / fps for c in np.cumsum(lengths)[:-1]]
    if path.exists():
        return cuts
    tmp = path.with_suffix(".partial.mp4")
    with av.open(str(tmp), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width = stream.height = SIZE
        stream.pix_fmt = "yuv420p"
        stream.options = {"preset": "veryfast", "crf": "23", "g": str(2 * fps)}
        written = 0
        for length in lengths:
            colour = rng.integers(0, 256, 3)
            texture = rng.integers(-40, 40, (SIZE, SIZE, 3))
            base = np.clip(colour + texture, 0, 255).astype(np.int16)
            for i in range(min(length, total - written)):
                noise = rng.integers(-6, 6, (SIZE, SIZE, 3), dtype=np.int16)
                image = np.clip(base + noise, 0, 255).astype(np.uint8)
                x = (2 * i) % SIZE
                image[SIZE // 4 : SIZE // 2, x : x + 12] = 255
                frame = av.VideoFrame.from_ndarray(image, format="rgb24")
                container.mux(stream.encode(frame))
                written += 1
        container.mux(stream.encode(None))
    tmp.rename(path)
    return cuts


def plain_decode(path: Path) -> int:
    """Decode every frame once, sequentially; returns the frame count."""
    import av

    count = 0
    with av.open(str(path)) as container:
        for _ in container.decode(container.streams.video[0]):
            count += 1
    return count


def segment_pass(path: Path, image_size: int) -> dict[str, Any]:
    """One shots pass, consuming segments as they come (never holding them all): counts and
    the segment boundaries (seconds)."""
    from tb_reranker.video.segment import Segment, iter_segments

    segments = failures = 0
    starts: list[float] = []
    for item in iter_segments(path, "shots", num_frames=12, image_size=image_size):
        segments += isinstance(item, Segment)
        failures += not isinstance(item, Segment)
        starts.append(item.start_s)
    return {"segments": segments, "failures": failures, "boundaries": starts[1:]}


def _timed(fn: Any) -> tuple[float, Any]:
    started = time.perf_counter()
    value = fn()
    return time.perf_counter() - started, value


def _near(found: list[float], truth: list[float], tolerance_s: float) -> float:
    """Share of ``found`` times within ``tolerance_s`` of a ``truth`` time."""
    hits = sum(any(abs(f - t) <= tolerance_s for t in truth) for f in found)
    return hits / len(found) if found else 1.0


def run(args: argparse.Namespace) -> dict[str, Any]:
    minutes = 1.0 if args.quick else args.minutes
    repeats = 1 if args.quick else args.repeats
    cache = Path(tempfile.gettempdir()) / "tb_bench_segment"
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / f"shots_{minutes:g}min_{args.fps}fps_{SIZE}px_seed{args.seed}.mp4"
    truth = make_video(path, minutes, args.fps, args.seed)
    times: dict[str, list[float]] = {"plain": [], "segment_224": [], "segment_32": []}
    counts: dict[str, Any] = {}
    plain_decode(path)  # warm the page cache and the libraries
    for _ in range(repeats):  # alternate, so load drifts hit every mode alike
        seconds, counts["frames"] = _timed(lambda: plain_decode(path))
        times["plain"].append(seconds)
        for size in (224, 32):
            seconds, counts[size] = _timed(lambda size=size: segment_pass(path, size))
            times[f"segment_{size}"].append(seconds)
    median = {name: statistics.median(values) for name, values in times.items()}
    found = counts[224]["boundaries"]
    return {
        "benchmark": "segment_cost",
        "config": {
            "minutes": minutes,
            "fps": args.fps,
            "size_px": SIZE,
            "frames": counts["frames"],
            "repeats": repeats,
            "spec": "shots",
            "num_frames": 12,
        },
        "plain_decode_s": round(median["plain"], 3),
        "segment_224_s": round(median["segment_224"], 3),
        "segment_32_s": round(median["segment_32"], 3),
        "ratio_224": round(median["segment_224"] / median["plain"], 3),
        "ratio_32": round(median["segment_32"] / median["plain"], 3),
        "segments": counts[224]["segments"],
        "failures": counts[224]["failures"],
        "true_cuts": len(truth),
        "boundaries": len(found),
        "boundaries_at_true_cut_2_frames": round(_near(found, truth, 2.0 / args.fps), 3),
        "samples_s": {name: [round(v, 3) for v in values] for name, values in times.items()},
        "target": {"ratio_224_max": 1.5},
        "environment": environment(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser)
    parser.add_argument("--minutes", type=float, default=10.0, help="video length (minutes)")
    parser.add_argument("--fps", type=int, default=25, help="frames per second")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each mode")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    emit("segment_cost", run(args), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
