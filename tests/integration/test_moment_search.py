"""Moments, not files (issue 22 §3): search over segment rows grouped by video, on Milvus Lite
and the 2.3.5 server (rows upserted here: random unit vectors, several segments per video,
schema 1 and 2), then the whole path: a real segmented ingest searched through ``Client`` and
``tb search`` as a subprocess on a fresh ``--data-dir``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import numpy as np
import pytest
import torch

from tb_reranker import Client
from tb_reranker.index import VideoIndex
from tb_reranker.index import schema as milvus_schema
from tb_reranker.model import TokenBinder, TokenBinderConfig, save_checkpoint

DIM = 16
SEGMENTS = [1, 3, 2, 4, 1, 3, 2, 1, 4, 3, 2, 3]  # segments of video v{i}


def _library(seed: int = 0) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    rows = []
    for v, count in enumerate(SEGMENTS):
        for s in range(count):
            vector = rng.normal(size=DIM).astype(np.float32)
            rows.append(
                {
                    "id": f"v{v}" if s == 0 else f"v{v}~{s}",
                    "cls": vector / np.linalg.norm(vector),
                    "uri": f"/lib/v{v}.mp4",
                    "duration_s": 5.0 * count,
                    "num_frames": 8,
                    "content_hash": f"h{v}",
                    "video_id": f"v{v}",
                    "segment": s,
                    "start_s": 5.0 * s,
                    "end_s": 5.0 * (s + 1),
                    "genre": "a" if v % 2 else "b",
                }
            )
    return rows


def _expected(rows, query, limit, per_video, keep=lambda row: True):
    """Brute force: the top ``limit`` videos by best segment, each its best segments."""
    scored = sorted(
        ((float(row["cls"] @ query), row) for row in rows if keep(row)), key=lambda x: -x[0]
    )
    videos: dict[str, list[tuple[float, str]]] = {}
    for score, row in scored:
        videos.setdefault(row["video_id"], []).append((score, row["id"]))
    order = list(videos)[:limit]
    return [(video, [key for _, key in videos[video][:per_video]]) for video in order]


def _grouped(hits):
    out: dict[str, list[str]] = {}
    for row in hits:
        out.setdefault(row["video_id"], []).append(row["id"])
    return list(out.items())


def _index(uri: str, collection: str, version: int) -> VideoIndex:
    index = VideoIndex(uri, collection=collection, dim=DIM)
    if version == milvus_schema.SCHEMA_VERSION:
        index.create()
    else:  # a collection made before segments: the segment fields are dynamic
        milvus_schema.create_collection(index.client, collection, DIM, version=version)
    return index


@pytest.mark.parametrize("version", [1, 2])
def test_grouped_search_is_the_brute_force_grouping(milvus_uri, unique_collection, version):
    rows = _library()
    with _index(milvus_uri, unique_collection, version) as index:
        index.upsert(rows)
        index.wait_until_indexed()
        queries = np.random.default_rng(1).normal(size=(4, DIM)).astype(np.float32)
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)
        for limit, per_video in [(3, 1), (5, 3), (12, 2), (20, 4)]:
            for grouping in ("auto", "client"):
                found = index.search(
                    queries,
                    limit,
                    group_size=per_video,
                    grouping=grouping,
                    consistency_level="Strong",
                )
                for q, hits in enumerate(found):
                    assert _grouped(hits) == _expected(rows, queries[q], limit, per_video)
                    for hit in hits:
                        assert hit["start_s"] == 5.0 * hit["segment"] and hit["uri"]
        # filters keep working with grouping: a wide one, and one video (both schema versions)
        found = index.search(
            queries[0], 4, 'genre == "a"', group_size=2, consistency_level="Strong"
        )[0]
        assert _grouped(found) == _expected(
            rows, queries[0], 4, 2, keep=lambda row: row["genre"] == "a"
        )
        inside = index.search(
            queries[0], 5, 'video_id == "v3"', group_size=4, consistency_level="Strong"
        )[0]
        assert _grouped(inside) == _expected(
            rows, queries[0], 5, 4, keep=lambda row: row["video_id"] == "v3"
        )
        moments = index.search(queries[0], 10, 'video_id == "v8"', consistency_level="Strong")[0]
        assert sorted(row["id"] for row in moments) == ["v8", "v8~1", "v8~2", "v8~3"]


def test_native_and_client_grouping_agree_on_lite(milvus_lite_uri, unique_collection):
    """The same data, Milvus grouping search forced on and off: the same hits."""
    rows = _library(seed=5)
    with _index(milvus_lite_uri, unique_collection, 2) as index:
        index.upsert(rows)
        index.flush()
        assert index._search._native_grouping()  # Lite 3.x and a schema-2 collection
        queries = np.random.default_rng(6).normal(size=(6, DIM)).astype(np.float32)
        for limit, per_video in [(1, 1), (4, 2), (7, 3), (12, 4)]:
            native = index.search(queries, limit, group_size=per_video, grouping="native")
            client = index.search(queries, limit, group_size=per_video, grouping="client")
            for a, b in zip(native, client, strict=True):
                assert [r["id"] for r in a] == [r["id"] for r in b]
                assert [r["score"] for r in a] == pytest.approx([r["score"] for r in b], abs=1e-5)


def test_grouped_search_is_exact_beyond_what_lite_groups(milvus_lite_uri, unique_collection):
    """200 videos of 6 segments: Lite's grouping search groups only its top 100 segments (a
    video found there by one segment comes back with one); the fill-in by key completes it, the
    same as the client grouping and the brute force; a video missing a middle segment is
    completed by the filtered fill-in."""
    rng = np.random.default_rng(7)
    rows = []
    for v in range(200):
        for s in range(6):
            vector = rng.normal(size=DIM).astype(np.float32)
            key = f"v{v}" if s == 0 else f"v{v}~{s}"
            span = {"start_s": 2.0 * s, "end_s": 2.0 * (s + 1), "duration_s": 12.0}
            span.update(video_id=f"v{v}", segment=s)
            rows.append({"id": key, "cls": vector / np.linalg.norm(vector), **span})
    with _index(milvus_lite_uri, unique_collection, 2) as index:
        index.upsert(rows)
        index.flush()
        gapped = {f"v{v}~2" for v in range(0, 200, 3)}
        index.delete(sorted(gapped))
        kept = [row for row in rows if row["id"] not in gapped]
        queries = rng.normal(size=(5, DIM)).astype(np.float32)
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)
        for grouping in ("native", "client"):
            found = index.search(
                queries, 8, group_size=4, grouping=grouping, consistency_level="Strong"
            )
            for q, hits in enumerate(found):
                assert _grouped(hits) == _expected(kept, queries[q], 8, 4)


def test_legacy_rows_are_their_own_videos(milvus_uri, unique_collection):
    """A schema-1 collection holding rows written before segments (no segment fields) and new
    segmented ones: an old row reads as segment 0 of its own video, [0, duration]."""
    rows = _library(seed=2)
    legacy = [
        {k: v for k, v in row.items() if k not in milvus_schema.SEGMENT_FIELDS}
        for row in rows
        if row["video_id"] in ("v0", "v4", "v7")  # one-segment videos
    ]
    fresh = [row for row in rows if row["video_id"] not in ("v0", "v4", "v7")]
    with _index(milvus_uri, unique_collection, 1) as index:
        # written as before segments: raw, without the segment fields (prepare_rows adds them)
        index.client.upsert(
            unique_collection, [{**row, "cls": row["cls"].tolist()} for row in legacy]
        )
        index.upsert(fresh)
        index.wait_until_indexed()
        query = np.asarray(legacy[1]["cls"])  # v4's own vector: v4 first
        hits = index.search(query, 12, group_size=3, consistency_level="Strong")[0]
        assert _grouped(hits) == _expected(rows, query, 12, 3)
        first = hits[0]
        assert (first["id"], first["video_id"], first["segment"]) == ("v4", "v4", 0)
        assert (first["start_s"], first["end_s"]) == (0.0, first["duration_s"])


# ------------------------------------------------------------------ the user's path
@pytest.fixture(scope="module")
def library(tmp_path_factory, mp4_writer):
    """A tiny checkpoint whose focused view scores, two 6 s videos and three short clips."""
    root = tmp_path_factory.mktemp("moments")
    torch.manual_seed(0)
    model = TokenBinder(TokenBinderConfig.tiny())
    with torch.no_grad():
        model.fusion.head[-1].weight.normal_(0, 0.5)
    checkpoint = save_checkpoint(model, root / "checkpoint")
    colours = mp4_writer.colours
    for i in range(2):
        mp4_writer(root / "long" / f"long{i}.mp4", colours[i], frames=48, fps=8)
    for i in range(3):
        mp4_writer(root / "short" / f"clip{i}.mp4", colours[2 + i], frames=8 + 2 * i, fps=8)
    return root, checkpoint


def test_client_searches_moments_of_segmented_videos(library, tmp_path):
    root, checkpoint = library
    with Client(data_dir=str(tmp_path / "data"), checkpoint=str(checkpoint)) as client:
        report = client.ingest([str(root / "long")], progress=False, segment="fixed:2")
        assert report.ingested == 2 and not report.failed
        client.ingest([str(root / "short")], progress=False)
        client.index.flush()
        hits = client.search("a red square", limit=5)
        assert sorted(h.id for h in hits) == ["clip0", "clip1", "clip2", "long0", "long1"]
        assert [h.rank for h in hits] == [1, 2, 3, 4, 5]
        for hit in hits:
            best = hit.moments[0]
            assert (hit.start_s, hit.end_s, hit.score) == (best.start_s, best.end_s, best.score)
            if hit.id.startswith("long"):
                assert len(hit.moments) == 3 and hit.end_s - hit.start_s == pytest.approx(2.0)
                assert len({m.start_s for m in hit.moments}) == 3
            else:
                assert hit.start_s == 0.0 and hit.end_s == hit.metadata["duration_s"]
                assert len(hit.moments) == 1
        assert any(h.reranked for h in hits) and any(abs(h.delta) > 1e-4 for h in hits)

        moments = client.search("a red square", limit=8, group="moment")
        assert len(moments) == 8 and all("~" not in h.id for h in moments)
        assert len({(h.id, h.start_s) for h in moments}) == 8  # distinct moments
        inside = client.search(
            "a red square", limit=10, filter='video_id == "long1"', group="moment"
        )
        assert {h.id for h in inside} == {"long1"} and len(inside) == 3
        one = client.search("a red square", limit=10, filter='video_id == "long1"')
        assert [h.id for h in one] == ["long1"] and len(one[0].moments) == 3


def _tb(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tb_reranker", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_tb_search_moments_json_on_a_fresh_data_dir(library, tmp_path):
    """``tb ingest`` of short clips (one segment each) then ``tb search --json`` and
    ``--moments --json``: start_s 0, end_s the duration, one moment each; bad options exit 2."""
    root, checkpoint = library
    env = {k: v for k, v in os.environ.items() if not k.startswith("TB_")}
    common = ["--data-dir", str(tmp_path / "data"), "--checkpoint", str(checkpoint)]
    ingest = _tb("ingest", str(root / "short"), *common, "--no-progress", env=env)
    assert ingest.returncode == 0, ingest.stderr
    videos = _tb("search", "a green square", "--json", "--limit", "2", *common, env=env)
    assert videos.returncode == 0, videos.stderr
    hits = json.loads(videos.stdout)[0]["hits"]
    assert len(hits) == 2
    moments = _tb("search", "a green square", "--moments", "--json", *common, env=env)
    assert moments.returncode == 0, moments.stderr
    as_moments = json.loads(moments.stdout)[0]["hits"]
    assert len(as_moments) == 3
    assert [h["id"] for h in as_moments[:2]] == [h["id"] for h in hits]
    for hit in [*hits, *as_moments]:
        assert hit["start_s"] == 0.0 and hit["end_s"] == hit["metadata"]["duration_s"]
        assert hit["moments"] == [
            {
                "start_s": 0.0,
                "end_s": hit["end_s"],
                "score": hit["score"],
                "broad_score": hit["broad_score"],
            }
        ]
    inside = _tb(
        "search", "a green square", "--filter", 'video_id == "clip1"', "--json", *common, env=env
    )
    assert [h["id"] for h in json.loads(inside.stdout)[0]["hits"]] == ["clip1"]
    bad = _tb("search", "x", "--moments-per-video", "17", *common, env=env)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert len(bad.stderr.strip().splitlines()) <= 2, bad.stderr  # usage line + one error
