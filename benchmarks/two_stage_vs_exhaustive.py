"""Two-stage search (exact top-K + TokenBinder fusion on K) vs exhaustive fine-grained scoring.

What the coarse-to-fine design avoids: applying the focused view to every video of the corpus.

* **two-stage** (per query): cosine of I_1 with all N video [CLS] vectors (numpy, exact; the
  number Milvus' ANN search would improve on), top-K, gather the K candidates' frame tokens
  (fp16, in memory), one ``focused_scores`` call on K candidates. Reported with its breakdown.
* **exhaustive** (per query): ``focused_scores`` over all N videos, as N/K groups of K
  candidates (the fusion's per-candidate cost, batched in chunks). Measured over a whole corpus
  pass when it fits the time budget, else extrapolated linearly from timed chunks (flagged).
* **exhaustive, cached K/V**: the same with every video's K/V projection precomputed (what a
  per-video cache would give; N x 48 KiB of memory at D = 512, T = 12), extrapolated from chunks.

A measured full pass includes gathering each chunk's tokens from memory (as the two-stage path
does for its K); chunk timings used for extrapolation exclude it.

Synthetic data: N random unit vectors (D) and a pool of min(N, 20k) random frame-token sets
(T x D, fp16) that video i reads as pool[i % pool] (the arithmetic is the same; the pool keeps
memory bounded on shared machines). Tokens come from memory, so store reads are excluded (see
benchmarks/store_get.py). Random weights: this measures cost, not quality.

    python -m benchmarks.two_stage_vs_exhaustive            # N = 10k, 100k (<= ~10 min, 2 cores)
    python -m benchmarks.two_stage_vs_exhaustive --quick    # N = 2k, 10k in well under a minute
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from typing import Any

import numpy as np

from benchmarks._fusion_model import build_fusion_model, random_unit
from benchmarks.common import (
    add_common_arguments,
    configure_threads,
    emit,
    environment,
    plot_lines,
    summarize,
    time_calls,
)

log = logging.getLogger("benchmarks.two_stage_vs_exhaustive")

NAME = "two_stage_vs_exhaustive"
TOKEN_POOL = 20_000  # distinct token sets held in memory at most


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser)
    parser.add_argument("--sizes", type=int, nargs="+", default=None, help="corpus sizes N")
    parser.add_argument("--dim", type=int, default=512, help="D (default 512)")
    parser.add_argument("--frames", type=int, default=12, help="T (default 12)")
    parser.add_argument("--top-k", type=int, default=10, help="K (default 10)")
    parser.add_argument("--indicators", type=int, default=4, help="m (default 4)")
    parser.add_argument("--heads", type=int, default=8, help="fusion heads (default 8)")
    parser.add_argument("--queries", type=int, default=None, help="timed two-stage queries")
    parser.add_argument("--chunk", type=int, default=100, help="groups of K per exhaustive call")
    parser.add_argument(
        "--budget-s", type=float, default=None, help="seconds for the exhaustive passes in all"
    )
    args = parser.parse_args(argv)
    if args.sizes is None:
        args.sizes = [2_000, 10_000] if args.quick else [10_000, 100_000]
    if args.queries is None:
        args.queries = 10 if args.quick else 30
    if args.budget_s is None:
        args.budget_s = 20.0 if args.quick else 300.0
    if min(args.sizes) < args.top_k:
        parser.error("every size must be >= --top-k")
    return args


def measure_size(
    model: Any, N: int, args: argparse.Namespace, rng: np.random.Generator, budget_left: float
) -> tuple[dict[str, Any], float]:
    """Two-stage and exhaustive timings at corpus size N; returns (result, budget left)."""
    import torch

    D, T, K, m = args.dim, args.frames, args.top_k, args.indicators
    t_setup = time.perf_counter()
    vectors = random_unit(rng, N, D)  # [N, D] video [CLS], fp32
    pool_size = min(N, TOKEN_POOL)
    pool = np.empty((pool_size, T, D), dtype=np.float16)  # [P, T, D], filled in blocks
    for start in range(0, pool_size, 2_000):
        stop = min(pool_size, start + 2_000)
        pool[start:stop] = random_unit(rng, stop - start, T, D)
    queries = torch.from_numpy(random_unit(rng, args.queries, m, D))  # [Q, m, D]
    log.info("N=%d: data ready in %.1f s", N, time.perf_counter() - t_setup)

    # ---- two-stage: exact top-K on CLS, then the fusion on K
    breakdown: dict[str, list[float]] = {"broad_ms": [], "fetch_ms": [], "fusion_ms": []}

    def two_stage(q: int, record: bool) -> np.ndarray:
        t0 = time.perf_counter_ns()
        scores = vectors @ queries[q, 0].numpy()  # [N] cosine (unit vectors)
        top = np.argpartition(-scores, K - 1)[:K]
        top = top[np.argsort(-scores[top])]  # [K] best first
        t1 = time.perf_counter_ns()
        cand_tokens = torch.from_numpy(pool[top % pool_size].astype(np.float32))  # [K, T, D]
        cand_cls = torch.from_numpy(vectors[top])  # [K, D]
        t2 = time.perf_counter_ns()
        with torch.inference_mode():
            out = model.focused_scores(queries[q : q + 1], cand_cls[None], cand_tokens[None])
        order = top[torch.argsort(out.final[0], descending=True).numpy()]
        t3 = time.perf_counter_ns()
        if record:
            breakdown["broad_ms"].append((t1 - t0) / 1e6)
            breakdown["fetch_ms"].append((t2 - t1) / 1e6)
            breakdown["fusion_ms"].append((t3 - t2) / 1e6)
        return order

    for q in range(min(3, args.queries)):  # warm-up
        two_stage(q, record=False)
    samples = []
    for q in range(args.queries):
        t0 = time.perf_counter_ns()
        two_stage(q, record=True)
        samples.append((time.perf_counter_ns() - t0) / 1e6)
    two_stage_timing = summarize(samples)

    # ---- exhaustive: the fusion over all N videos, in chunks of `chunk` groups of K
    groups = math.ceil(N / K)
    chunk = min(args.chunk, groups)
    rows = np.arange(chunk * K) % pool_size
    chunk_tokens = torch.from_numpy(pool[rows].astype(np.float32)).view(chunk, K, T, D)
    chunk_cls = torch.from_numpy(vectors[np.arange(chunk * K) % N]).view(chunk, K, D)
    query = queries[:1].expand(chunk, m, D)  # one query against every group

    def exhaustive_chunk() -> None:
        with torch.inference_mode():
            model.focused_scores(query, chunk_cls, chunk_tokens)

    chunk_timing = time_calls(exhaustive_chunk, warmup=1, repeats=5, max_seconds=30)
    chunks_per_pass = groups / chunk
    estimate_s = chunk_timing.median_ms * chunks_per_pass / 1e3
    measured_full = estimate_s <= budget_left / 2
    if measured_full:  # one real pass over the corpus (new tokens per chunk index)
        t0 = time.perf_counter()
        for start in range(0, groups, chunk):
            size = min(chunk, groups - start)
            ids = (np.arange(start * K, (start + size) * K) % N) % pool_size
            tokens = torch.from_numpy(pool[ids].astype(np.float32)).view(size, K, T, D)
            cls = torch.from_numpy(vectors[np.arange(start * K, (start + size) * K) % N])
            with torch.inference_mode():
                model.focused_scores(queries[:1].expand(size, m, D), cls.view(size, K, D), tokens)
        exhaustive_ms = (time.perf_counter() - t0) * 1e3
        budget_left -= exhaustive_ms / 1e3
    else:
        exhaustive_ms = chunk_timing.median_ms * chunks_per_pass

    # ---- exhaustive with every video's K/V projection cached (chunk timing, extrapolated)
    with torch.inference_mode():
        chunk_kv = model.project_candidates(chunk_tokens.view(chunk * K, T, D))
        chunk_kv = chunk_kv.view(chunk, K, *chunk_kv.shape[1:])

    def exhaustive_cached_chunk() -> None:
        with torch.inference_mode():
            model.focused_scores(query, chunk_cls, cand_kv=chunk_kv)

    cached_timing = time_calls(exhaustive_cached_chunk, warmup=1, repeats=5, max_seconds=30)
    exhaustive_cached_ms = cached_timing.median_ms * chunks_per_pass
    kv_bytes_per_video = chunk_kv[0, 0].numel() * 4

    result = {
        "N": N,
        "token_pool": pool_size,
        "two_stage": two_stage_timing.to_dict(),
        "two_stage_breakdown_median_ms": {
            k: round(float(np.median(v)), 4) for k, v in breakdown.items()
        },
        "exhaustive": {
            "per_query_ms": round(exhaustive_ms, 2),
            "measured_full_pass": measured_full,
            "chunk_videos": chunk * K,
            "chunk": chunk_timing.to_dict(),
            "per_video_us": round(chunk_timing.median_ms * 1e3 / (chunk * K), 3),
        },
        "exhaustive_cached_kv": {
            "per_query_ms": round(exhaustive_cached_ms, 2),
            "extrapolated_from_chunks": True,
            "chunk": cached_timing.to_dict(),
            "cache_bytes_for_corpus": kv_bytes_per_video * N,
        },
        "speedup_two_stage_vs_exhaustive": round(exhaustive_ms / two_stage_timing.median_ms, 1),
        "speedup_two_stage_vs_exhaustive_cached": round(
            exhaustive_cached_ms / two_stage_timing.median_ms, 1
        ),
    }
    log.info(
        "N=%d: two-stage %.2f ms, exhaustive %.0f ms (%s)",
        N,
        two_stage_timing.median_ms,
        exhaustive_ms,
        "measured" if measured_full else "extrapolated",
    )
    return result, budget_left


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    configure_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    D, T, K, m = args.dim, args.frames, args.top_k, args.indicators
    model = build_fusion_model(
        embed_dim=D, num_frames=T, num_indicators=m, top_k=K, fusion_heads=args.heads
    )
    results = []
    budget_left = args.budget_s
    for N in args.sizes:
        result, budget_left = measure_size(model, N, args, rng, budget_left)
        results.append(result)
    return {
        "benchmark": NAME,
        "config": {
            "D": D,
            "T": T,
            "K": K,
            "m": m,
            "fusion_heads": args.heads,
            "queries": args.queries,
            "chunk_groups": args.chunk,
            "budget_s": args.budget_s,
            "threads": args.threads,
            "quick": args.quick,
            "broad_stage": "numpy exact cosine top-K (Milvus ANN would be faster at large N)",
        },
        "environment": environment(),
        "results": results,
    }


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = parse_args(argv)
    result = run(args)
    emit(NAME, result, args.out)
    if not args.no_plot:
        sizes = [r["N"] for r in result["results"]]
        path = plot_lines(
            args.out / f"{NAME}.png",
            {
                "two-stage (top-K + fusion on K)": (
                    sizes,
                    [r["two_stage"]["median_ms"] for r in result["results"]],
                ),
                "exhaustive fusion": (
                    sizes,
                    [r["exhaustive"]["per_query_ms"] for r in result["results"]],
                ),
                "exhaustive, cached K/V": (
                    sizes,
                    [r["exhaustive_cached_kv"]["per_query_ms"] for r in result["results"]],
                ),
            },
            title=f"Per-query latency (D={args.dim}, T={args.frames}, K={args.top_k})",
            xlabel="videos in the corpus (N)",
            ylabel="ms per query (median)",
            logx=True,
            logy=True,
        )
        log.info("wrote %s", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
