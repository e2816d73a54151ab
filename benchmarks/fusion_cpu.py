"""CPU cost of the focused-view fusion at K=10, T=12, D=512 (ViT-B/32 sizes), m=4.

Builds only the fusion module (no CLIP towers) and times one query and a batch of 64, with the
candidate K/V projected per call ("direct"), taken from a per-video cache ("cached"), or never
formed ("tokens": the K/V-free path of issue 12, scores straight from the frame tokens), for
both heads. Prints JSON: median ms per call, ms per query and queries/s.

    .venv/bin/python benchmarks/fusion_cpu.py [--threads N] [--repeats 30] [--device cuda]

(``--device cuda``: the same on a GPU, float32 unless ``--bf16``; calls end with a sync.)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import torch

from tb_reranker.model.fusion import FocusedFusion


def _time(fn: Any, repeats: int, warmup: int = 3, device: str = "cpu") -> float:
    """Median wall-clock seconds of ``fn()`` (synchronised on CUDA)."""

    def call() -> None:
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    for _ in range(warmup):
        call()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def measure(
    head: str,
    batch: int,
    kv: str,
    *,
    k: int,
    t: int,
    d: int,
    m: int,
    repeats: int,
    device: str = "cpu",
    bf16: bool = False,
) -> dict[str, Any]:
    torch.manual_seed(0)
    fusion = FocusedFusion(
        d,
        num_queries=m - 1,
        max_frames=t,
        max_candidates=k,
        heads=8,
        head=head,
        rank_embedding=head == "listwise",
    ).eval()
    fusion.to(device)
    queries = torch.randn(batch, m - 1, d, device=device)
    frames_tokens = torch.randn(batch * k, t, d, device=device)  # the candidates' frame tokens
    with torch.inference_mode():
        cache = fusion.project_candidates(frames_tokens).view(batch, k, -1, 2, t, d)

    def direct() -> None:
        kv = fusion.project_candidates(frames_tokens).view(batch, k, -1, 2, t, d)
        fusion(queries, kv)

    def from_cache() -> None:
        fusion(queries, cache)

    candidates_tokens = frames_tokens.view(batch, k, t, d)

    def from_tokens() -> None:
        fusion(queries, cand_tokens=candidates_tokens)

    calls = {"direct": direct, "cached": from_cache, "tokens": from_tokens}
    autocast = torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16)
    with torch.inference_mode(), autocast:
        seconds = _time(calls[kv], repeats, device=device)
    return {
        "head": head,
        "batch": batch,
        "kv": kv,
        "ms_per_call": round(seconds * 1e3, 3),
        "ms_per_query": round(seconds * 1e3 / batch, 4),
        "queries_per_s": round(batch / seconds, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--t", type=int, default=12)
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--m", type=int, default=4)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = [
        measure(
            head,
            batch,
            kv,
            k=args.k,
            t=args.t,
            d=args.d,
            m=args.m,
            repeats=args.repeats,
            device=args.device,
            bf16=args.bf16,
        )
        for head in ("symmetric", "listwise")
        for batch in (1, 64)
        for kv in ("direct", "tokens", "cached")
    ]
    report = {
        "benchmark": "fusion_cpu",
        "K": args.k,
        "T": args.t,
        "D": args.d,
        "m": args.m,
        "threads": torch.get_num_threads(),
        "device": args.device,
        "bf16": args.bf16,
        "torch": torch.__version__,
        "results": results,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
