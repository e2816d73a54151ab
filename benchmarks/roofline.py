"""How fast can a search be on this machine? The matrix products alone, measured in one run.

    .venv/bin/python -m benchmarks.roofline [--threads 2] [--quick]

Issue 12's rerank targets are absolute (<= 1 ms per query, >= 2,500 queries/s at batch 64),
so whether they can be met depends on the machine. This script times only the matrix products
a search cannot skip, at the shapes of a ViT-B/32-sized TokenBinder (D = 512, T = 12, m = 4,
K = 10, symmetric head), each on its own weights, in the fastest float32 form this library has
(oneDNN packed weights; the attention's batched products with ``torch.bmm``):

* ``fusion_batch1``: the K/V-free fusion of one query (the ``Reranker``'s cold path): query,
  key and value projections folded onto the queries, out projection, FFN, head;
* ``fusion_batch64``: the same for 64 queries at once;
* ``text_10_words``: the 12 layers' linear layers of the text tower over the 18 positions of a
  10-word query, and ``text_full``: the same over all 77 (the path before issue 12 ran them).

No softmax, LayerNorm, gather or Python: a real call costs more, so each figure is a floor.
A cold rerank also reads its candidates' frame tokens: ``store_read`` times ``get_many`` of 10
and of 640 records (fp16, T 12 x D 512) from a real LMDB store of 3,000 videos, and
``verdicts`` adds the two: a target below that sum is not met by this formulation on this
machine. The hardware's own bounds are given beside each floor: the weights' bytes over the
weight-streaming rate (M = 1 row over 151 MB of weights, the ViT-B/32 text tower's size) and
the FLOPs over the best float32 GEMM rate (640 x 512 x 2048, cached weight). Prints JSON,
writes ``roofline.json``.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from benchmarks.common import add_common_arguments, configure_threads, emit, environment

__all__ = ["main", "fusion_products", "text_products"]

log = logging.getLogger(__name__)

D, T, M_INDICATORS, K, HEADS, TEXT_LAYERS, TEXT_WIDTH = 512, 12, 4, 10, 8, 12, 512
Q = M_INDICATORS - 1  # fused indicators


def _median_ms(fn: Callable[[], Any], *, calls: int, max_seconds: float) -> float:
    for _ in range(3):
        fn()
    samples = []
    started = time.perf_counter()
    for _ in range(calls):
        t0 = time.perf_counter_ns()
        fn()
        samples.append((time.perf_counter_ns() - t0) / 1e6)
        if time.perf_counter() - started > max_seconds and len(samples) >= 5:
            break
    samples.sort()
    return samples[len(samples) // 2]


@dataclass(frozen=True)
class Product:
    """One matrix product of a search, ready to time."""

    run: Callable[[], Any]
    flops: float
    weight_bytes: int  # model weights it reads (0 for products of activations only)


def _linear(rows: int, in_features: int, out_features: int) -> Product:
    """A packed float32 linear layer (``PackedLinear``, what a prepared model runs) on ``rows``
    rows."""
    import torch

    from tb_reranker.model.packed_linear import PackedLinear

    weight = torch.randn(out_features, in_features) / in_features**0.5
    bias = torch.zeros(out_features)
    layer = PackedLinear(weight, bias)
    x = torch.randn(rows, in_features)
    return Product(
        lambda: layer(x),
        2.0 * rows * in_features * out_features,
        4 * (weight.numel() + bias.numel()),
    )


def _bmm(batch: int, n: int, k: int, m: int, *, weight: bool = False) -> Product:
    """``torch.bmm`` of [batch, n, k] by [batch, k, m]; ``weight``: the right operand is a
    model weight (read from memory every call)."""
    import torch

    a, b = torch.randn(batch, n, k), torch.randn(batch, k, m)
    return Product(lambda: torch.bmm(a, b), 2.0 * batch * n * k * m, 4 * b.numel() if weight else 0)


def fusion_products(batch: int) -> list[Product]:
    """The K/V-free fusion's products for ``batch`` queries (one block, symmetric head)."""
    head_dim, rows = D // HEADS, batch * Q
    return [
        _linear(rows, D, D),  # q_proj
        _bmm(HEADS, rows, head_dim, D, weight=True),  # u = W_k,hᵀ q_h (keys never formed)
        _bmm(batch, HEADS * Q, D, K * T),  # logits u·x over the K·T tokens
        _bmm(batch * K, Q * HEADS, T, D),  # per-candidate pooled inputs Σ a x
        _bmm(HEADS, batch * K * Q, D, head_dim, weight=True),  # value projection
        _linear(rows, D, D),  # out_proj
        _linear(rows, D, 4 * D),  # FFN
        _linear(rows, 4 * D, D),
        _linear(batch * K, Q * (D + 1), D),  # symmetric head
        _linear(batch * K, D, 1),
    ]


def text_products(positions: int) -> list[Product]:
    """The text tower's linear layers over ``positions`` rows (12 layers, width 512; distinct
    weights per layer, as in the model)."""
    width = TEXT_WIDTH
    per_layer = [(width, 3 * width), (width, width), (width, 4 * width), (4 * width, width)]
    return [_linear(positions, i, o) for _ in range(TEXT_LAYERS) for i, o in per_layer]


def _floor(products: list[Product], rates: dict[str, float], **timing: Any) -> dict[str, float]:
    flops = sum(p.flops for p in products)
    weight_bytes = sum(p.weight_bytes for p in products)

    def run() -> None:
        for product in products:
            product.run()

    ms = _median_ms(run, **timing)
    return {
        "floor_ms": round(ms, 3),
        "gflop": round(flops / 1e9, 4),
        "gflop_s": round(flops / ms / 1e6, 1),
        "weight_mb": round(weight_bytes / 1e6, 2),
        "bound_bytes_ms": round(weight_bytes / rates["weight_stream_gb_s"] / 1e6, 3),
        "bound_flops_ms": round(flops / rates["gemm_gflop_s"] / 1e6, 3),
    }


def _rates(**timing: Any) -> dict[str, float]:
    """Weight streaming (M = 1 over 151 MB) and the best GEMM rate (cached weight)."""
    stream = [_linear(1, 512, 2048) for _ in range(36)]
    stream_ms = _median_ms(lambda: [p.run() for p in stream], **timing)
    gemm = _linear(640, 512, 2048)
    gemm_ms = _median_ms(gemm.run, **timing)
    return {
        "weight_stream_gb_s": round(sum(p.weight_bytes for p in stream) / stream_ms / 1e6, 2),
        "gemm_gflop_s": round(gemm.flops / gemm_ms / 1e6, 1),
    }


def _store_read(videos: int, counts: tuple[int, ...], **timing: Any) -> dict[str, float]:
    """p50 ms of ``get_many`` of ``count`` random ids from a real LMDB store of fp16 tokens."""
    import tempfile
    from pathlib import Path

    import numpy as np

    from benchmarks.rerank_cost import _fill_store

    rng = np.random.default_rng(0)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        store = _fill_store(Path(tmp) / "frames", videos, 0)
        try:
            for count in counts:
                ids = [f"video{i:06d}" for i in rng.choice(videos, count, replace=False)]
                out[count] = _median_ms(lambda ids=ids: store.get_many(ids), **timing)
        finally:
            store.close()
    return out


def _verdicts(floors: dict[str, Any], reads: dict[int, float], batch: int) -> dict[str, Any]:
    one = floors["fusion_batch1"]["floor_ms"] + reads[K]
    many = floors["fusion_batch64"]["floor_ms"] + reads[batch * K]
    best_qps = batch * 1e3 / many
    return {
        "cold_rerank_p50_le_1ms": {
            "target_ms": 1.0,
            "floor_ms": round(one, 3),
            "of_which_store_read_ms": round(reads[K], 3),
            "possible": one <= 1.0,
        },
        "cold_rerank_ge_2500_qps": {
            "batch": batch,
            "target_queries_per_s": 2500.0,
            "ceiling_queries_per_s": round(best_qps, 1),
            "ceiling_without_store_read": round(
                batch * 1e3 / floors["fusion_batch64"]["floor_ms"], 1
            ),
            "possible": best_qps >= 2500.0,
        },
        "text_encoding_3x": {
            "linear_layers_full_over_10_words": round(
                floors["text_full"]["floor_ms"] / floors["text_10_words"]["floor_ms"], 3
            ),
            "note": "the truncation's share; the path before also ran unpacked weights",
        },
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser)
    parser.add_argument("--calls", type=int, default=60, help="timed calls per figure")
    parser.add_argument("--max-seconds", type=float, default=8.0, help="time cap per figure")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    configure_threads(args.threads)
    import torch

    timing = {
        "calls": 5 if args.quick else args.calls,
        "max_seconds": 0.5 if args.quick else args.max_seconds,
    }
    batch = 8 if args.quick else 64
    started = time.perf_counter()
    with torch.no_grad():
        rates = _rates(**timing)
        floors = {
            "fusion_batch1": _floor(fusion_products(1), rates, **timing),
            "fusion_batch64": _floor(fusion_products(batch), rates, **timing),  # 8: --quick
            "text_10_words": _floor(text_products(18), rates, **timing),
            "text_full": _floor(text_products(77), rates, **timing),
        }
    reads = _store_read(300 if args.quick else 3000, (K, batch * K), **timing)
    result: dict[str, Any] = {
        "benchmark": "roofline",
        "quick": args.quick,
        "shapes": {"D": D, "T": T, "m": M_INDICATORS, "K": K, "heads": HEADS, "layers": 12},
        "environment": environment(),
        "rates": rates,
        "floors": floors,
        "store_read_ms": {f"get_many_{n}": round(ms, 3) for n, ms in reads.items()},
        "verdicts": _verdicts(floors, reads, batch),
        "elapsed_s": round(time.perf_counter() - started, 1),
    }
    emit("roofline", result, args.out)
    return result


if __name__ == "__main__":
    main()
