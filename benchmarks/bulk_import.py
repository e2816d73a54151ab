"""Backfill into a Milvus 2.3.5 server: batched upserts vs bulk import (issue 23, part 2).

    python -m benchmarks.bulk_import [--quick] [--rows N] [--dim D] [--rows-per-file F]

One local Milvus 2.3.5 standalone server (the PyPI ``milvus`` package, local storage, started for
the run) and N rows shaped like ``video_row`` output (random unit vectors of dimension D, the
scalar and segment fields, two metadata fields; 5 segments per video). Each way fills a fresh
collection made by ``VideoIndex.create()`` (HNSW, schema 2), in the same run:

* ``upsert``: ``VideoIndex.upsert`` called with 1,000 rows at a time, as ``tb ingest`` writes
  (``UPSERT_ROWS``; each call is one gRPC upsert), then one ``flush`` (what ingest does at the
  end; reported separately: the rows are readable before it);
* ``bulk``: :class:`tb_reranker.index.bulk.BulkImport`: ``add`` in the same 1,000-row calls
  (checks, the existing-id lookup, Parquet files of ``--rows-per-file`` rows under the server's
  storage root), then ``commit`` (one import job per file, polled, and the wait until the row
  count shows every row).

Both times are wall clock from the first row handed over until every row counts (``count(*)``,
Strong); ``until_indexed_s`` adds the flush and the wait until the HNSW index covers every row
(``VideoIndex.wait_until_indexed``). Prints JSON with seconds, rows/s, ``speedup_bulk_vs_upsert``
(upsert seconds / bulk seconds) and ``speedup_until_indexed``, checks both row counts equal N, and writes ``--out/bulk_import.json`` (not with ``--quick``: 5,000 rows).
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import add_common_arguments, emit, environment

__all__ = ["synthetic_rows", "run", "main"]

log = logging.getLogger("benchmarks.bulk_import")

SEGMENTS = 5  # segments per synthetic video
CALL_ROWS = 1000  # rows per upsert / add call (tb ingest's UPSERT_ROWS)
NOTES = (
    "Milvus 2.3.5 standalone with local storage on this machine; the bulk import reads Parquet "
    "files from the server's storage root. bulk_s includes writing the files and the wait "
    "between the jobs' 'Completed' and the rows showing in count(*) (the query node loads the "
    "imported segments; seconds, independent of N). upsert seconds exclude the final flush "
    "(flush_s, which ingest adds) and the HNSW build after it (indexed_s); until_indexed_s is "
    "the time until every row is readable and covered by the vector index, the fair comparison "
    "for a backfill. Measured: a 2.3.5 import job is Completed before its segments are "
    "indexed; the two 50,000-row imported segments took longer to index than the upserted "
    "(smaller) segments."
)


def synthetic_rows(n: int, dim: int, seed: int, start: int = 0) -> Iterator[list[dict[str, Any]]]:
    """Rows ``start..start+n`` in lists of at most CALL_ROWS, shaped like ``video_row``'s."""
    rng = np.random.default_rng(seed)
    for first in range(start, start + n, CALL_ROWS):
        count = min(CALL_ROWS, start + n - first)
        vectors = rng.standard_normal((count, dim)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        batch = []
        for offset in range(count):
            video, segment = divmod(first + offset, SEGMENTS)
            video_id = f"video{video:07d}"
            batch.append(
                {
                    "genre": ("cats", "dogs", "birds")[video % 3],
                    "rank": video,
                    "id": video_id if segment == 0 else f"{video_id}~{segment}",
                    "cls": vectors[offset],
                    "uri": f"/data/videos/{video_id}.mp4",
                    "duration_s": 50.0,
                    "num_frames": 12,
                    "content_hash": f"sha256:{video:064x}",
                    "video_id": video_id,
                    "segment": segment,
                    "start_s": 10.0 * segment,
                    "end_s": 10.0 * segment + 10.0,
                }
            )
        yield batch


def _fresh(uri: str, name: str, dim: int) -> Any:
    from tb_reranker.index import VideoIndex

    index = VideoIndex(uri, collection=name, dim=dim, timeout=120.0)
    index.drop()
    index.create()
    return index


def _upsert(uri: str, rows: int, dim: int, seed: int) -> dict[str, Any]:
    index = _fresh(uri, "bench_upsert", dim)
    batches = list(synthetic_rows(rows, dim, seed))
    started = time.perf_counter()
    for batch in batches:
        index.upsert(batch)
    count = index.count()
    upsert_s = time.perf_counter() - started
    started = time.perf_counter()
    index.flush()
    flush_s = time.perf_counter() - started
    index.wait_until_indexed(timeout=1800)
    indexed_s = time.perf_counter() - started - flush_s
    index.close()
    return {
        "seconds": round(upsert_s, 3),
        "rows_per_s": round(rows / upsert_s, 1),
        "flush_s": round(flush_s, 3),
        "indexed_s": round(indexed_s, 3),
        "until_indexed_s": round(upsert_s + flush_s + indexed_s, 3),
        "calls": len(batches),
        "count": count,
    }


def _bulk(uri: str, storage: Path, rows: int, dim: int, seed: int, per_file: int) -> dict[str, Any]:
    from tb_reranker.index.bulk import BulkImport

    index = _fresh(uri, "bench_bulk", dim)
    batches = list(synthetic_rows(rows, dim, seed))
    started = time.perf_counter()
    with BulkImport(index, staging=storage / "bulk", rows_per_file=per_file) as sink:
        for batch in batches:
            sink.add(batch)
        staged = time.perf_counter() - started
        imported = sink.commit()
        jobs = len(sink.staged_files)
    bulk_s = time.perf_counter() - started
    count = index.count()
    started = time.perf_counter()
    index.wait_until_indexed(timeout=1800)  # Completed jobs are not indexed yet on 2.3.5
    indexed_s = time.perf_counter() - started
    index.close()
    return {
        "seconds": round(bulk_s, 3),
        "rows_per_s": round(rows / bulk_s, 1),
        "add_s": round(staged, 3),
        "commit_s": round(bulk_s - staged, 3),
        "indexed_s": round(indexed_s, 3),
        "until_indexed_s": round(bulk_s + indexed_s, 3),
        "jobs": jobs,
        "rows_per_file": per_file,
        "imported": imported,
        "count": count,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    from milvus_setup.launcher import LocalMilvus

    rows = 5000 if args.quick else args.rows
    with tempfile.TemporaryDirectory(prefix="tb_bulk_bench_") as folder:
        server = LocalMilvus(Path(folder) / "server")
        server.start()
        try:
            storage = Path(server.base_dir) / "data"  # localStorage.path of the server
            upsert = _upsert(server.uri, rows, args.dim, args.seed)
            log.info("upsert: %s", upsert)
            bulk = _bulk(server.uri, storage, rows, args.dim, args.seed, args.rows_per_file)
            log.info("bulk: %s", bulk)
        finally:
            server.stop()
    if upsert["count"] != rows or bulk["count"] != rows:
        raise SystemExit(f"row counts {upsert['count']} / {bulk['count']}, expected {rows}")
    return {
        "benchmark": "bulk_import",
        "command": "python -m benchmarks.bulk_import"
        + (" --quick" if args.quick else f" --rows {rows}"),
        "rows": rows,
        "dim": args.dim,
        "segments_per_video": SEGMENTS,
        "engine": "Milvus 2.3.5 standalone (local storage), HNSW (M 16, efConstruction 200)",
        "upsert": upsert,
        "bulk": bulk,
        "speedup_bulk_vs_upsert": round(upsert["seconds"] / bulk["seconds"], 2),
        "speedup_until_indexed": round(upsert["until_indexed_s"] / bulk["until_indexed_s"], 2),
        "counts_ok": True,
        "notes": NOTES,
        "environment": environment(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser)
    parser.add_argument("--rows", type=int, default=100_000, help="rows to write each way")
    parser.add_argument("--dim", type=int, default=512, help="vector dimension (ViT-B's 512)")
    parser.add_argument(
        "--rows-per-file", type=int, default=50_000, help="rows per import file (= per job)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("pymilvus").setLevel(logging.WARNING)
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    emit("bulk_import", run(args), None if args.quick else args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
