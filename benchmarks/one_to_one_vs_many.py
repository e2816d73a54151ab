"""One-to-many fusion (TokenBinder) vs a one-to-one baseline at equal K: reranking latency.

For one query and K candidates (D = 512, T = 12 frame tokens each):

* **one-to-many**: one ``focused_scores`` call; the indicators attend over all K x T tokens at
  once (the candidates are compared jointly: one softmax across every candidate's frames).
* **one-to-one, sequential**: K calls, each scoring one candidate with its own cross-attention
  pass over its T tokens (how a per-pair cross-encoder reranker is usually invoked).
* **one-to-one, batched**: the same K independent passes as one batch (B = K, one candidate
  each): the best case of the one-to-one baseline.

Each also with the candidates' K/V projections precomputed (``project_candidates``, as the
sidecar's per-video cache serves them). Besides latency the script reports how much the scores
differ between the joint and the independent passes (same weights): the one-to-many softmax
makes candidates compete, which a one-to-one pass cannot express. Random weights: cost only.

    python -m benchmarks.one_to_one_vs_many            # K = 5, 10, 20, 50 (~2-3 min on 2 cores)
    python -m benchmarks.one_to_one_vs_many --quick    # K = 5, 10
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

import numpy as np

from benchmarks._fusion_model import build_fusion_model, random_unit
from benchmarks.common import (
    add_common_arguments,
    configure_threads,
    emit,
    environment,
    plot_lines,
    time_calls,
)

log = logging.getLogger("benchmarks.one_to_one_vs_many")

NAME = "one_to_one_vs_many"
VARIANTS = (
    "one_to_many",
    "one_to_one_sequential",
    "one_to_one_batched",
    "one_to_many_cached_kv",
    "one_to_one_sequential_cached_kv",
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser)
    parser.add_argument("--ks", type=int, nargs="+", default=None, help="candidate counts K")
    parser.add_argument("--dim", type=int, default=512, help="D (default 512)")
    parser.add_argument("--frames", type=int, default=12, help="T (default 12)")
    parser.add_argument("--indicators", type=int, default=4, help="m (default 4)")
    parser.add_argument("--heads", type=int, default=8, help="fusion heads (default 8)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per variant")
    parser.add_argument(
        "--max-seconds", type=float, default=None, help="time cap per variant and K"
    )
    args = parser.parse_args(argv)
    if args.ks is None:
        args.ks = [5, 10] if args.quick else [5, 10, 20, 50]
    if args.repeats is None:
        args.repeats = 10 if args.quick else 30
    if args.max_seconds is None:
        args.max_seconds = 3.0 if args.quick else 10.0
    if min(args.ks) < 1:
        parser.error("K must be >= 1")
    return args


def measure_k(model: Any, K: int, args: argparse.Namespace, rng: np.random.Generator) -> dict:
    """Latency of every variant at K candidates, and the joint-vs-independent score gap."""
    import torch

    D, T, m = args.dim, args.frames, args.indicators
    indicators = torch.from_numpy(random_unit(rng, 1, m, D))  # [1, m, D]
    cand_cls = torch.from_numpy(random_unit(rng, 1, K, D))  # [1, K, D]
    cand_tokens = torch.from_numpy(random_unit(rng, 1, K, T, D))  # [1, K, T, D]
    with torch.inference_mode():
        cand_kv = model.project_candidates(cand_tokens[0])[None]  # [1, K, n_blocks, 2, T, D]

    def one_to_many() -> torch.Tensor:
        return model.focused_scores(indicators, cand_cls, cand_tokens).final[0]  # [K]

    def one_to_one_sequential() -> torch.Tensor:
        return torch.cat(
            [
                model.focused_scores(
                    indicators, cand_cls[:, k : k + 1], cand_tokens[:, k : k + 1]
                ).final[0]
                for k in range(K)
            ]
        )  # [K]

    def one_to_one_batched() -> torch.Tensor:
        out = model.focused_scores(
            indicators.expand(K, m, D),  # [K, m, D]: the query once per candidate
            cand_cls.view(K, 1, D),  # [K, 1, D]
            cand_tokens.view(K, 1, T, D),  # [K, 1, T, D]
        )
        return out.final[:, 0]  # [K]

    def one_to_many_cached_kv() -> torch.Tensor:
        return model.focused_scores(indicators, cand_cls, cand_kv=cand_kv).final[0]

    def one_to_one_sequential_cached_kv() -> torch.Tensor:
        return torch.cat(
            [
                model.focused_scores(
                    indicators, cand_cls[:, k : k + 1], cand_kv=cand_kv[:, k : k + 1]
                ).final[0]
                for k in range(K)
            ]
        )

    functions = {
        "one_to_many": one_to_many,
        "one_to_one_sequential": one_to_one_sequential,
        "one_to_one_batched": one_to_one_batched,
        "one_to_many_cached_kv": one_to_many_cached_kv,
        "one_to_one_sequential_cached_kv": one_to_one_sequential_cached_kv,
    }
    timings = {}
    with torch.inference_mode():
        for name, fn in functions.items():
            timings[name] = time_calls(
                fn, warmup=2, repeats=args.repeats, max_seconds=args.max_seconds
            ).to_dict()
        joint = one_to_many()
        independent = one_to_one_batched()
        sequential = one_to_one_sequential()
    agree = torch.allclose(independent, sequential, atol=1e-4)
    same_order = bool(
        torch.equal(
            torch.argsort(joint, descending=True), torch.argsort(independent, descending=True)
        )
    )
    base = timings["one_to_many"]["median_ms"]
    return {
        "K": K,
        "timings": timings,
        "speedup_vs_one_to_one_sequential": round(
            timings["one_to_one_sequential"]["median_ms"] / base, 2
        ),
        "speedup_vs_one_to_one_batched": round(
            timings["one_to_one_batched"]["median_ms"] / base, 2
        ),
        "one_to_one_batched_equals_sequential": bool(agree),
        "mean_abs_score_gap_joint_vs_independent": round(
            float((joint - independent).abs().mean()), 6
        ),
        "same_order_joint_vs_independent": same_order,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    configure_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    model = build_fusion_model(
        embed_dim=args.dim,
        num_frames=args.frames,
        num_indicators=args.indicators,
        top_k=max(args.ks),
        fusion_heads=args.heads,
    )
    results = []
    for K in args.ks:
        result = measure_k(model, K, args, rng)
        log.info(
            "K=%d: one-to-many %.2f ms, one-to-one sequential %.2f ms, batched %.2f ms",
            K,
            result["timings"]["one_to_many"]["median_ms"],
            result["timings"]["one_to_one_sequential"]["median_ms"],
            result["timings"]["one_to_one_batched"]["median_ms"],
        )
        results.append(result)
    return {
        "benchmark": NAME,
        "config": {
            "D": args.dim,
            "T": args.frames,
            "m": args.indicators,
            "fusion_heads": args.heads,
            "head": model.config.head,
            "repeats": args.repeats,
            "threads": args.threads,
            "quick": args.quick,
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
        ks = [r["K"] for r in result["results"]]
        path = plot_lines(
            args.out / f"{NAME}.png",
            {
                name.replace("_", " "): (
                    ks,
                    [r["timings"][name]["median_ms"] for r in result["results"]],
                )
                for name in VARIANTS
            },
            title=f"Rerank latency per query (D={args.dim}, T={args.frames})",
            xlabel="candidates K",
            ylabel="ms per query (median)",
            logy=True,
        )
        log.info("wrote %s", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
