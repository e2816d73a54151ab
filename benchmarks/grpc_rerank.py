"""Rerank over gRPC on loopback vs in process, and sidecar throughput with micro-batching on/off.

``python -m benchmarks.grpc_rerank [--quick] [--no-d512]`` prints one JSON document:

- ``latency``: per-call Rerank time at K = 10 with the indicators and broad scores given (the
  SDK's remote path), in process (``Reranker.rerank``) vs over gRPC (sync stub, one client),
  batching on and off; p50/p95/p99 in ms. K/V cache warm in both.
- ``throughput``: Rerank calls/s with 1 and 32 concurrent clients (asyncio, one channel each),
  batching on and off, plus the mean batch size the server formed.

The sidecar runs in a child process (so client and server do not share a GIL), on 127.0.0.1.
Setups: ``tiny`` (D 64, T 8, the offline test model) and ``d512`` (fusion at the paper's width:
D 512, T 12, 4 indicators; tiny CLIP towers since only the fusion runs).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import multiprocessing as mp
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import (
    add_common_arguments,
    configure_threads,
    emit,
    environment,
    time_calls,
)

log = logging.getLogger("benchmarks.grpc_rerank")

NUM_VIDEOS = 200
TOP_K = 10


def build(kind: str, directory: Path, seed: int) -> tuple[Any, list[str]]:
    """Components (model + LMDB store + Reranker) of one setup, identical for the same seed."""
    from tb_reranker.server.testing import build_tiny_components

    if kind == "tiny":
        return build_tiny_components(directory, num_videos=NUM_VIDEOS, seed=seed)
    import torch

    from benchmarks._fusion_model import build_fusion_model
    from tb_reranker.rerank import Reranker
    from tb_reranker.server.engine import Components
    from tb_reranker.server.testing import tiny_records
    from tb_reranker.stores import open_store

    torch.manual_seed(seed)
    model = build_fusion_model(embed_dim=512, num_frames=12, num_indicators=4, top_k=TOP_K)
    store = open_store(str(directory / "frames"))
    ids = [f"vid-{n:04d}" for n in range(NUM_VIDEOS)]
    store.put_many(tiny_records(model, ids, seed=seed))
    return Components(reranker=Reranker(model, store), device="cpu", dtype="float32"), ids


def requests_for(reranker: Any, ids: list[str], count: int, seed: int) -> list[Any]:
    """``count`` Rerank requests: random indicators, a window of K ids, descending broad scores."""
    from tb_reranker._pb.tb_reranker.v1 import reranker_pb2 as pb
    from tb_reranker.wire.convert import tensor_to_proto

    rng = np.random.default_rng(seed)
    m, dim = reranker.num_indicators, reranker.embed_dim
    out = []
    for n in range(count):
        indicators = rng.standard_normal((m, dim)).astype(np.float32)
        indicators /= np.linalg.norm(indicators, axis=-1, keepdims=True)
        start = (n * 7) % (len(ids) - TOP_K)
        out.append(
            pb.RerankRequest(
                indicators=tensor_to_proto(indicators),
                candidates_ids=ids[start : start + TOP_K],
                broad_scores=list(np.linspace(0.5, 0.3, TOP_K)),
            )
        )
    return out


def _child(
    conn: Any, kind: str, batching: bool, seed: int, threads: int, max_wait_ms: float
) -> None:
    """Sidecar process: build, serve on a free port, report it, wait for 'stop'."""
    configure_threads(threads)
    from tb_reranker.server.config import ServerConfig
    from tb_reranker.server.testing import ServerThread

    with tempfile.TemporaryDirectory() as tmp:
        components, _ = build(kind, Path(tmp), seed)
        config = ServerConfig(
            port=0,
            batching=batching,
            max_batch=32,
            max_wait_ms=max_wait_ms,
            max_concurrency=256,
        )
        with ServerThread(config, lambda: components) as running:
            conn.send(running.port)
            conn.recv()
            hist = running.server.metrics.batch_size.labels("rerank")
            conn.send({"batches": hist._sum.get(), "count": _hist_count(hist)})  # noqa: SLF001


def _hist_count(histogram: Any) -> float:
    for metric in histogram.collect():
        for sample in metric.samples:
            if sample.name.endswith("_count"):
                return sample.value
    return 0.0


async def _throughput(target: str, requests: list[Any], clients: int, calls: int) -> float:
    import grpc

    from tb_reranker._pb.tb_reranker.v1 import reranker_pb2_grpc as pb_grpc

    channels = [grpc.aio.insecure_channel(target) for _ in range(clients)]
    stubs = [pb_grpc.RerankServiceStub(ch) for ch in channels]

    async def client(n: int) -> None:
        for k in range(calls):
            await stubs[n].Rerank(requests[(n * calls + k) % len(requests)], timeout=120)

    await asyncio.gather(
        *(stubs[n].Rerank(requests[n % len(requests)], timeout=120) for n in range(clients))
    )
    started = time.perf_counter()
    await asyncio.gather(*(client(n) for n in range(clients)))
    elapsed = time.perf_counter() - started
    for channel in channels:
        await channel.close()
    return clients * calls / elapsed


def measure(kind: str, args: argparse.Namespace) -> dict[str, Any]:
    import grpc

    from tb_reranker._pb.tb_reranker.v1 import reranker_pb2_grpc as pb_grpc
    from tb_reranker.wire.convert import tensor_from_proto

    repeats = 40 if args.quick else 300
    calls = 10 if args.quick else 40
    with tempfile.TemporaryDirectory() as tmp:
        components, ids = build(kind, Path(tmp), args.seed)
        reranker = components.reranker
        requests = requests_for(reranker, ids, 64, args.seed)
        # in process: the same call the servicer makes (indicators + broad scores, K = 10)
        queue = iter(range(10**9))

        def local_call() -> None:
            request = requests[next(queue) % len(requests)]
            reranker.rerank(
                tensor_from_proto(request.indicators)[None],
                [list(request.candidates_ids)],
                [list(request.broad_scores)],
            )

        for request in requests:  # warm the K/V cache: every window once
            reranker.rerank(
                tensor_from_proto(request.indicators)[None],
                [list(request.candidates_ids)],
                [list(request.broad_scores)],
            )
        result: dict[str, Any] = {
            "embed_dim": reranker.embed_dim,
            "num_frames": int(reranker.model.num_frames),
            "top_k": TOP_K,
            "latency": {"in_process": time_calls(local_call, warmup=20, repeats=repeats).to_dict()},
            "throughput": {},
        }
    context = mp.get_context("spawn")
    for batching in (True, False):
        parent, child = context.Pipe()
        process = context.Process(
            target=_child,
            args=(child, kind, batching, args.seed, args.threads, args.max_wait_ms),
            daemon=True,
        )
        process.start()
        try:
            port = parent.recv()
            target = f"127.0.0.1:{port}"
            label = "batching_on" if batching else "batching_off"
            with grpc.insecure_channel(target) as channel:
                stub = pb_grpc.RerankServiceStub(channel)
                for request in requests:  # warm the server's K/V cache the same way
                    stub.Rerank(request, timeout=60)
                queue = iter(range(10**9))

                def remote_call(stub: Any = stub, queue: Any = queue) -> None:
                    stub.Rerank(requests[next(queue) % len(requests)], timeout=60)

                result["latency"][f"grpc_{label}"] = time_calls(
                    remote_call, warmup=20, repeats=repeats
                ).to_dict()
            result["throughput"][label] = {
                f"clients_{clients}": round(
                    asyncio.run(_throughput(target, requests, clients, calls)), 1
                )
                for clients in (1, 32)
            }
            parent.send("stop")
            stats = parent.recv()
            result["throughput"][label]["mean_batch_size"] = round(
                stats["batches"] / max(stats["count"], 1), 2
            )
        finally:
            process.join(30)
            if process.is_alive():
                process.terminate()
    in_process = result["latency"]["in_process"]["median_ms"]
    result["latency"]["grpc_overhead_p50_ms"] = round(
        result["latency"]["grpc_batching_off"]["median_ms"] - in_process, 3
    )
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser)
    parser.add_argument("--no-d512", action="store_true", help="only the tiny model")
    parser.add_argument(
        "--max-wait-ms", type=float, default=0.0, help="server batch window in ms (default 0)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    configure_threads(args.threads)
    setups = ["tiny"] if args.no_d512 else ["tiny", "d512"]
    output = {
        "benchmark": "grpc_rerank",
        "environment": environment(),
        "max_wait_ms": args.max_wait_ms,
        "setups": {kind: measure(kind, args) for kind in setups},
    }
    emit("grpc_rerank", output, None if args.no_plot and args.quick else args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
