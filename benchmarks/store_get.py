"""Frame-token store read latency: ``get_many`` of K random videos from an LMDB store.

    python -m benchmarks.store_get [--videos 10000] [--frames 12] [--dim 512] [--k 10]

Fills a fresh store (fp16 tokens, T x D per video) in batches of 1,000, then times warm
``get_many(K)`` calls on random ids (and single ``get_many([id])`` calls). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from tb_reranker.stores import FrameRecord, LmdbFrameStore


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=10000, help="videos in the store")
    parser.add_argument("--frames", type=int, default=12, help="T, frames per video")
    parser.add_argument("--dim", type=int, default=512, help="D, token width")
    parser.add_argument("--k", type=int, default=10, help="ids per get_many (K)")
    parser.add_argument("--calls", type=int, default=2000, help="timed calls")
    parser.add_argument("--dir", default=None, help="store directory (default: a temp dir)")
    args = parser.parse_args(argv)

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.dir or tmp) / "frames"
        store = LmdbFrameStore(path)
        tokens = rng.standard_normal((1000, args.frames, args.dim)).astype(np.float16)
        timestamps = np.arange(args.frames, dtype=np.float32)
        started = time.perf_counter()
        for start in range(0, args.videos, 1000):
            store.put_many(
                {
                    f"video{i:07d}": FrameRecord(tokens[i % 1000], timestamps, f"h{i}")
                    for i in range(start, min(args.videos, start + 1000))
                }
            )
        fill_s = time.perf_counter() - started
        ids = [f"video{i:07d}" for i in range(args.videos)]
        for _ in range(200):  # warm up
            store.get_many(list(rng.choice(ids, args.k, replace=False)))
        batch, single = [], []
        for _ in range(args.calls):
            wanted = list(rng.choice(ids, args.k, replace=False))
            t0 = time.perf_counter()
            got = store.get_many(wanted)
            batch.append(time.perf_counter() - t0)
            assert len(got) == args.k
            t0 = time.perf_counter()
            store.get_many(wanted[:1])
            single.append(time.perf_counter() - t0)
        size_mb = sum(f.stat().st_size for f in path.iterdir()) / 1e6
        store.close()

    def us(values: list[float], q: float) -> float:
        return round(float(np.quantile(values, q)) * 1e6, 1)

    result = {
        "benchmark": "store_get",
        "backend": "lmdb",
        "videos": args.videos,
        "frames": args.frames,
        "dim": args.dim,
        "dtype": "float16",
        "k": args.k,
        "fill_s": round(fill_s, 2),
        "fill_videos_per_s": round(args.videos / fill_s, 1),
        "store_mb": round(size_mb, 1),
        f"get_many_{args.k}_p50_us": us(batch, 0.5),
        f"get_many_{args.k}_p95_us": us(batch, 0.95),
        f"get_many_{args.k}_mean_us": round(statistics.fmean(batch) * 1e6, 1),
        "get_one_p50_us": us(single, 0.5),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
