"""Shared helpers of the benchmark scripts: timing with warm-up, percentiles, JSON, PNG plots.

Every benchmark prints one JSON document on stdout (and writes it, with a PNG, under ``--out``),
so results can be diffed and pasted into ``docs/benchmarks.md``. Timings are wall-clock
(``time.perf_counter_ns``) of whole calls after warm-up; on a shared 2-core machine they move by
tens of percent from run to run, so each result also records the machine's load.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "Timing",
    "time_calls",
    "summarize",
    "environment",
    "add_common_arguments",
    "configure_threads",
    "emit",
    "plot_lines",
    "plot_bars",
    "prepared",
]

log = logging.getLogger(__name__)

DEFAULT_OUT = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Timing:
    """Summary of repeated calls, in milliseconds."""

    n: int  # timed calls (after warm-up)
    median_ms: float  # 50th percentile
    p95_ms: float  # 95th percentile (nearest rank)
    p99_ms: float  # 99th percentile (nearest rank)
    mean_ms: float  # arithmetic mean
    min_ms: float  # fastest call
    max_ms: float  # slowest call

    def to_dict(self) -> dict[str, float]:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def _percentile(ordered: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an ascending sequence (q in [0, 100])."""
    if not ordered:
        raise ValueError("no samples")
    rank = max(1, min(len(ordered), int(-(-q * len(ordered) // 100))))  # ceil(q/100 * n)
    return float(ordered[rank - 1])


def summarize(samples_ms: Sequence[float]) -> Timing:
    """median / p95 / p99 / mean / min / max of per-call times in ms."""
    ordered = sorted(float(s) for s in samples_ms)
    if not ordered:
        raise ValueError("no samples to summarise")
    return Timing(
        n=len(ordered),
        median_ms=float(statistics.median(ordered)),
        p95_ms=_percentile(ordered, 95),
        p99_ms=_percentile(ordered, 99),
        mean_ms=float(statistics.fmean(ordered)),
        min_ms=ordered[0],
        max_ms=ordered[-1],
    )


def time_calls(
    fn: Callable[[], Any],
    *,
    warmup: int = 3,
    repeats: int = 20,
    max_seconds: float | None = None,
    min_repeats: int = 3,
) -> Timing:
    """Call ``fn()`` ``warmup`` times untimed, then up to ``repeats`` times timed.

    ``max_seconds`` bounds the timed phase (at least ``min_repeats`` calls are always made), so
    slow configurations stay within a benchmark's time budget.
    """
    if repeats < 1 or min_repeats < 1:
        raise ValueError("repeats and min_repeats must be >= 1")
    for _ in range(warmup):
        fn()
    samples: list[float] = []
    started = time.perf_counter()
    for i in range(repeats):
        t0 = time.perf_counter_ns()
        fn()
        samples.append((time.perf_counter_ns() - t0) / 1e6)
        over = max_seconds is not None and time.perf_counter() - started > max_seconds
        if over and i + 1 >= min_repeats:
            break
    return summarize(samples)


def environment() -> dict[str, Any]:
    """What the numbers were measured on."""
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
    }
    with contextlib.suppress(OSError):  # not on every OS
        info["load_avg_1m"] = round(os.getloadavg()[0], 2)
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        info["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:  # pragma: no cover
        pass
    try:
        import numpy

        info["numpy"] = numpy.__version__
    except ImportError:  # pragma: no cover
        pass
    return info


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """``--quick``, ``--out``, ``--threads``, ``--seed``, ``--no-plot``."""
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run in seconds")
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help=f"folder for JSON + PNG (default {DEFAULT_OUT})",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic data")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG")


def prepared(model: Any, *, packed: bool = True) -> Any:
    """A copy of ``model`` prepared for inference as search and serving load it
    (``TokenBinder.prepare_for_inference``: frozen weights, fingerprints computed once) with its
    linear layers on packed weights, or with ``packed=False`` on PyTorch's own modules as before
    issue 12 (the baseline of the text-encoding, rerank and search benchmarks). ``model`` itself
    is left as it is."""
    import copy

    from tb_reranker.model import packed_linear

    previous = None if packed else packed_linear.set_enabled(False)
    try:
        return copy.deepcopy(model).prepare_for_inference()
    finally:
        if previous is not None:
            packed_linear.set_enabled(previous)


def configure_threads(threads: int) -> None:
    if threads > 0:
        import torch

        torch.set_num_threads(threads)


def emit(name: str, result: Mapping[str, Any], out_dir: Path | None) -> Path | None:
    """Print ``result`` as JSON on stdout and write ``<out_dir>/<name>.json``; returns its path."""
    text = json.dumps(result, indent=2, sort_keys=False, default=_jsonable)
    print(text)
    if out_dir is None:
        return None
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(text + "\n")
    log.info("wrote %s", path)
    return path


def _jsonable(value: Any) -> Any:
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def plot_lines(
    path: Path,
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    logx: bool = False,
    logy: bool = False,
) -> Path:
    """One line per series ``name -> (xs, ys)``, saved as PNG."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for name, (xs, ys) in series.items():
        ax.plot(list(xs), list(ys), marker="o", label=name)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_bars(
    path: Path,
    groups: Sequence[str],
    series: Mapping[str, Sequence[float]],
    *,
    title: str,
    ylabel: str,
    logy: bool = False,
) -> Path:
    """Grouped bars: ``groups`` on x, one bar per series in each group, saved as PNG."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    width = 0.8 / max(1, len(series))
    for i, (name, values) in enumerate(series.items()):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, list(values), width=width, label=name)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(list(groups))
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    if logy:
        ax.set_yscale("log")
    ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
