"""Cost of segmenting at decode time: shots + T frames per segment vs a plain decode.

    python -m benchmarks.segment_cost [--quick] [--size 640x360] [--minutes 10] [--fps 25]
                                      [--repeats 3]

Generates (once, cached under ``<tmp>/tb_bench_segment``, the file name keyed by every parameter)
an H.264 video of ``--minutes`` at ``--fps``: shots of 1-20 s (seeded), each a blocky colour field
with fine texture that pans, a moving bar and per-frame noise, so frames cost what real frames of
that size cost to decode (the bitrate is reported). Two sizes are measured in the same run, each
its own row: ``--size`` (default 640x360, a realistic library's) and 96x96 (tiny frames, where the
fixed per-frame and per-segment work shows). For each size, alternately, in one process:

* ``plain``: one sequential PyAV decode of every frame, nothing else (the baseline);
* ``segment_224``: ``iter_segments(spec="shots")`` with T = 12 at 224 px (ViT-B's input): shot
  detection + 12 CLIP-preprocessed frames per segment, consumed as they come;
* ``segment_32``: the same at 32 px (the tiny test model's input), where preprocessing is cheap,
  so the ratio shows the detection and buffering overhead.

One more, untimed-for-the-ratio pass per size splits ``segment_224`` into stages (wall time inside
the shot detector, inside frame preprocessing, and the rest: decoding and bookkeeping). Prints
JSON with the median seconds and the ratios to ``plain`` of each row (issue 22's target:
``segment_224 / plain <= 1.5`` at the realistic size), and writes it to
``--out/segment_cost.json``.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from benchmarks.common import add_common_arguments, emit, environment

__all__ = ["make_video", "plain_decode", "segment_pass", "stage_times", "run", "main"]

log = logging.getLogger("benchmarks.segment_cost")

DEFAULT_SIZE = (640, 360)  # a realistic library's frames (360p)
TINY_SIZE = (96, 96)  # the second row: fixed per-frame/per-segment work dominates
CACHE = Path(tempfile.gettempdir()) / "tb_bench_segment"
NOISE_BANK = 8  # distinct noise fields cycled through (drawing one per frame is slow at 360p)


def parse_size(text: str) -> tuple[int, int]:
    """``WxH`` -> (width, height), both even and >= 16 (H.264 4:2:0)."""
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be WxH, e.g. 640x360, got {text!r}") from None
    if width < 16 or height < 16 or width % 2 or height % 2:
        raise argparse.ArgumentTypeError(f"size must be even and >= 16 on both sides: {text!r}")
    return width, height


def _shot_lengths(minutes: float, fps: int, seed: int) -> tuple[list[int], int]:
    import numpy as np

    rng = np.random.default_rng(seed)
    total = int(round(minutes * 60 * fps))
    lengths: list[int] = []
    while sum(lengths) < total:
        lengths.append(int(rng.uniform(1.0, 20.0) * fps))
    return lengths, total


def _shot_base(rng: Any, width: int, height: int) -> Any:
    """A shot's picture: 8x8-pixel colour blocks around one colour, plus fine texture (int16)."""
    import numpy as np

    colour = rng.integers(40, 216, 3)
    blocks = rng.integers(-50, 50, (-(-height // 8), -(-width // 8), 3))
    coarse = np.repeat(np.repeat(blocks, 8, axis=0), 8, axis=1)[:height, :width]
    fine = rng.integers(-20, 20, (height, width, 3))
    return np.clip(colour + coarse + fine, 0, 255).astype(np.int16)


def make_video(
    path: Path, minutes: float, fps: int, seed: int, size: tuple[int, int] = DEFAULT_SIZE
) -> list[float]:
    """Write the benchmark video to ``path`` (if absent); returns its true cut times (s)."""
    import av
    import numpy as np

    lengths, total = _shot_lengths(minutes, fps, seed)
    cuts = [float(c) / fps for c in np.cumsum(lengths)[:-1]]
    if path.exists():
        return cuts
    width, height = size
    rng = np.random.default_rng(seed + 1)
    noise = rng.integers(-12, 12, (NOISE_BANK, height, width, 3), dtype=np.int16)
    bar_w, bar_h = max(4, width // 8), max(4, height // 4)
    tmp = path.with_suffix(".partial.mp4")
    log.info("encoding %s (%d frames, once)", path.name, total)
    with av.open(str(tmp), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "veryfast", "crf": "23", "g": str(2 * fps)}
        written = 0
        for length in lengths:
            base = _shot_base(rng, width, height)
            for i in range(min(length, total - written)):
                image = np.roll(base, i % width, axis=1) + noise[written % NOISE_BANK]
                image = np.clip(image, 0, 255).astype(np.uint8)
                x = (2 * i) % max(1, width - bar_w)
                image[height // 4 : height // 4 + bar_h, x : x + bar_w] = 255
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


@contextmanager
def _timing(owner: Any, name: str, totals: dict[str, float], key: str) -> Iterator[None]:
    """Add the wall time of every ``owner.name`` call to ``totals[key]`` while inside."""
    original: Callable[..., Any] = getattr(owner, name)

    def timed(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            totals[key] += time.perf_counter() - started

    setattr(owner, name, timed)
    try:
        yield
    finally:
        setattr(owner, name, original)


def stage_times(path: Path, image_size: int) -> dict[str, float]:
    """One instrumented shots pass: seconds in the detector, in preprocessing, and the rest."""
    from tb_reranker.video import segment

    totals = {"detect_s": 0.0, "preprocess_s": 0.0}
    with (
        _timing(segment._CutDetector, "offer", totals, "detect_s"),
        _timing(segment._Settings, "preprocess", totals, "preprocess_s"),
    ):
        total, _ = _timed(lambda: segment_pass(path, image_size))
    totals["decode_and_rest_s"] = total - totals["detect_s"] - totals["preprocess_s"]
    return {name: round(value, 3) for name, value in totals.items()}


def _timed(fn: Any) -> tuple[float, Any]:
    started = time.perf_counter()
    value = fn()
    return time.perf_counter() - started, value


def _timed_cpu(fn: Any) -> tuple[float, float, Any]:
    """(wall s, CPU s of this process, all threads, value): the CPU time moves less with the
    other processes' load than the wall time does."""
    cpu = time.process_time()
    wall, value = _timed(fn)
    return wall, time.process_time() - cpu, value


def _near(found: list[float], truth: list[float], tolerance_s: float) -> float:
    """Share of ``found`` times within ``tolerance_s`` of a ``truth`` time."""
    hits = sum(any(abs(f - t) <= tolerance_s for t in truth) for f in found)
    return hits / len(found) if found else 1.0


def _load() -> float:
    import os

    return round(os.getloadavg()[0], 2)


def measure(size: tuple[int, int], minutes: float, fps: int, seed: int, repeats: int) -> dict:
    """One row: the video at ``size``, ``repeats`` alternating runs of every mode, medians."""
    CACHE.mkdir(parents=True, exist_ok=True)
    width, height = size
    path = CACHE / f"shots_v2_{minutes:g}min_{fps}fps_{width}x{height}_seed{seed}.mp4"
    truth = make_video(path, minutes, fps, seed, size)
    modes = ("plain", "segment_224", "segment_32")
    times: dict[str, list[float]] = {name: [] for name in modes}
    cpu: dict[str, list[float]] = {name: [] for name in modes}
    counts: dict[Any, Any] = {}
    loads: list[float] = []
    plain_decode(path)  # warm the page cache and the libraries
    for _ in range(repeats):  # alternate, so load drifts hit every mode alike
        loads.append(_load())
        wall, used, counts["frames"] = _timed_cpu(lambda: plain_decode(path))
        times["plain"].append(wall)
        cpu["plain"].append(used)
        for image_size in (224, 32):
            wall, used, counts[image_size] = _timed_cpu(lambda s=image_size: segment_pass(path, s))
            times[f"segment_{image_size}"].append(wall)
            cpu[f"segment_{image_size}"].append(used)
    median = {name: statistics.median(values) for name, values in times.items()}
    cpu_median = {name: statistics.median(values) for name, values in cpu.items()}
    found = counts[224]["boundaries"]
    duration = counts["frames"] / fps
    return {
        "size": f"{width}x{height}",
        "frames": counts["frames"],
        "bitrate_kbit_s": round(path.stat().st_size * 8 / 1000 / duration),
        "plain_decode_s": round(median["plain"], 3),
        "segment_224_s": round(median["segment_224"], 3),
        "segment_32_s": round(median["segment_32"], 3),
        "ratio_224": round(median["segment_224"] / median["plain"], 3),
        "ratio_32": round(median["segment_32"] / median["plain"], 3),
        "cpu_s": {name: round(value, 3) for name, value in cpu_median.items()},
        "cpu_ratio_224": round(cpu_median["segment_224"] / cpu_median["plain"], 3),
        "cpu_ratio_32": round(cpu_median["segment_32"] / cpu_median["plain"], 3),
        "stages_224": stage_times(path, 224),
        "segments": counts[224]["segments"],
        "failures": counts[224]["failures"],
        "true_cuts": len(truth),
        "boundaries": len(found),
        "boundaries_at_true_cut_2_frames": round(_near(found, truth, 2.0 / fps), 3),
        "samples_s": {name: [round(v, 3) for v in values] for name, values in times.items()},
        "load_avg_1m": loads,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    minutes = 1.0 if args.quick else args.minutes
    repeats = 1 if args.quick else args.repeats
    sizes = [args.size] + ([TINY_SIZE] if args.size != TINY_SIZE else [])
    rows = [measure(size, minutes, args.fps, args.seed, repeats) for size in sizes]
    return {
        "benchmark": "segment_cost",
        "config": {
            "minutes": minutes,
            "fps": args.fps,
            "repeats": repeats,
            "spec": "shots",
            "num_frames": 12,
            "video": "H.264 crf 23 veryfast, GOP 2 s; panning blocky texture + bar + noise",
        },
        "rows": rows,
        "target": {"ratio_224_max": 1.5, "size": rows[0]["size"]},
        "notes": NOTES,
        "environment": environment(),
    }


NOTES = (
    "ratio_*: wall-clock medians; cpu_ratio_*: this process's CPU seconds (all threads), which "
    "other processes' load moves less. The work segmentation adds does not shrink with the "
    "frame: 12 frames per segment preprocessed to 224 px exactly as open_clip does (a PIL "
    "bicubic resize, ~2.5 ms from 640x360, ~1 ms from 96x96) and 5 detector probes per second "
    "of video (a swscale downscale to 64 px + ContentDetector, ~0.1-0.2 ms each), plus a few "
    "us of Python per frame. A 640x360 frame decodes in ~0.4 ms, so that work is under half "
    "a plain decode; a 96x96 frame decodes in ~0.04 ms, so at 96x96 the same work is 2-3 "
    "plain decodes and the ratio stays above 1.5 (the preprocessing alone is ~1.5x)."
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser)
    parser.add_argument(
        "--size", type=parse_size, default=DEFAULT_SIZE, help="frame size WxH (default 640x360)"
    )
    parser.add_argument("--minutes", type=float, default=10.0, help="video length (minutes)")
    parser.add_argument("--fps", type=int, default=25, help="frames per second")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each mode")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    emit("segment_cost", run(args), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
