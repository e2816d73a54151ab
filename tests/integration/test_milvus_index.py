"""VideoIndex and milvus_setup against Milvus Lite and a real local Milvus server."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from tb_reranker.errors import (
    AlreadyExistsError,
    InvalidInputError,
    ModelMismatchError,
    NotFoundError,
)
from tb_reranker.index import VideoIndex
from tb_reranker.index import schema as milvus_schema

DIM = 16


def unit_rows(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((n, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return [
        {
            "id": f"vid{i:03d}",
            "cls": vectors[i],
            "uri": f"/videos/vid{i:03d}.mp4",
            "duration_s": float(i % 10),
            "num_frames": 8,
            "content_hash": f"h{i}",
            "genre": "cats" if i % 3 == 0 else "dogs",
        }
        for i in range(n)
    ]


def exact_top(rows: list[dict], query: np.ndarray, k: int, keep=lambda r: True) -> list[str]:
    kept = [r for r in rows if keep(r)]
    scores = np.stack([r["cls"] for r in kept]) @ query
    return [kept[i]["id"] for i in np.argsort(-scores, kind="stable")[:k]]


def test_schema_create_describe_drop(milvus_uri: str, unique_collection: str) -> None:
    index = VideoIndex(milvus_uri, collection=unique_collection, dim=DIM, fingerprint="fp-1")
    assert not index.exists()
    assert index.create() is True
    assert index.create() is False  # exists, compatible
    with pytest.raises(AlreadyExistsError):
        index.create(exist_ok=False)
    info = index.describe()
    assert info["dim"] == DIM and info["fingerprint"] == "fp-1" and info["dynamic_fields"]
    assert {f["name"] for f in info["fields"]} == {
        "id",
        "cls",
        "uri",
        "duration_s",
        "num_frames",
        "content_hash",
        "video_id",
        "segment",
        "start_s",
        "end_s",
    }
    assert info["schema_version"] == 2
    assert info["indexes"]["cls"]["metric_type"] == "COSINE"
    assert info["indexes"]["cls"]["index_type"] in ("HNSW", "AUTOINDEX")
    assert (
        milvus_schema.check_collection(index.client, unique_collection, dim=DIM, fingerprint="fp-1")
        == []
    )
    problems = milvus_schema.check_collection(
        index.client, unique_collection, dim=DIM + 1, fingerprint="x"
    )
    assert any("dim" in p for p in problems) and any("fingerprint" in p for p in problems)
    assert index.drop() is True
    assert not index.exists() and index.drop() is False


def test_fingerprint_mismatch_refused(milvus_uri: str, unique_collection: str) -> None:
    VideoIndex(milvus_uri, collection=unique_collection, dim=DIM, fingerprint="model-A").create()
    other = VideoIndex(milvus_uri, collection=unique_collection, fingerprint="model-B")
    with pytest.raises(ModelMismatchError, match="model-A"):
        other.search(np.ones(DIM), 3)
    with pytest.raises(ModelMismatchError):
        other.upsert(unit_rows(1))
    wrong_dim = VideoIndex(milvus_uri, collection=unique_collection, dim=DIM * 2)
    with pytest.raises(ModelMismatchError, match="-d"):
        wrong_dim.count()
    allowed = VideoIndex(
        milvus_uri,
        collection=unique_collection,
        fingerprint="model-B",
        allow_fingerprint_mismatch=True,
    )
    assert allowed.count() == 0
    assert not allowed.check_fingerprint()


def test_the_index_owns_its_model_binding(milvus_lite_uri: str, unique_collection: str) -> None:
    index = VideoIndex(milvus_lite_uri, collection=unique_collection)
    assert index.dim is None and index.fingerprint is None
    with pytest.raises(AttributeError):
        index.dim = DIM  # read-only: set by the constructor or bind(), both validate
    with pytest.raises(AttributeError):
        index.fingerprint = "fp-1"
    for bad in (0, -1, True, 2.0, "16"):
        with pytest.raises(InvalidInputError):
            index.bind(dim=bad)
        with pytest.raises(InvalidInputError):
            VideoIndex(milvus_lite_uri, collection=unique_collection, dim=bad)
    with pytest.raises(InvalidInputError):
        index.bind(fingerprint=7)
    with pytest.raises(ModelMismatchError):  # checks both before it adopts either
        VideoIndex(milvus_lite_uri, collection=unique_collection, dim=DIM).bind(
            fingerprint="fp-1", dim=DIM + 1
        )
    index.bind(fingerprint="fp-1", dim=DIM)
    index.bind(fingerprint="fp-1", dim=DIM)  # the same model again: fine
    with pytest.raises(ModelMismatchError, match="fp-1"):
        index.bind(fingerprint="fp-2", dim=DIM)
    with pytest.raises(ModelMismatchError, match="-d"):
        index.bind(dim=DIM + 1)
    assert (index.fingerprint, index.dim) == ("fp-1", DIM)  # a refused bind changes nothing
    half = VideoIndex(milvus_lite_uri, collection=unique_collection, dim=DIM)
    with pytest.raises(ModelMismatchError):
        half.bind(fingerprint="fp-1", dim=DIM + 1)
    assert half.fingerprint is None

    index.create()
    other = VideoIndex(milvus_lite_uri, collection=unique_collection, fingerprint="fp-2")
    with other.tolerating_mismatch():
        assert other.count() == 0
    with pytest.raises(ModelMismatchError):
        other.count()
    with other.tolerating_mismatch(False), pytest.raises(ModelMismatchError):
        other.count()


def test_upsert_search_filter_get_delete(milvus_uri: str, unique_collection: str) -> None:
    index = VideoIndex(milvus_uri, collection=unique_collection, dim=DIM, fingerprint="fp")
    index.create()
    rows = unit_rows(40)
    assert index.upsert(rows) == 40
    assert index.upsert(rows[:5]) == 5  # upsert by primary key: no duplicates
    assert index.count() == 40
    queries = np.stack([rows[7]["cls"], rows[21]["cls"]])
    hits = index.search(queries, 5, consistency_level="Strong")
    assert [h[0]["id"] for h in hits] == ["vid007", "vid021"]
    assert hits[0][0]["score"] == pytest.approx(1.0, abs=1e-4)
    assert [h["id"] for h in hits[0]] == exact_top(rows, rows[7]["cls"], 5)
    first = hits[0][0]
    assert first["uri"] == "/videos/vid007.mp4" and first["num_frames"] == 8
    assert first["duration_s"] == pytest.approx(7.0) and first["genre"] == "dogs"
    assert "cls" not in first
    scores = [h["score"] for h in hits[0]]
    assert scores == sorted(scores, reverse=True)

    filtered = index.search(
        rows[7]["cls"], 5, filter='genre == "cats" and duration_s > 3', consistency_level="Strong"
    )[0]
    assert filtered and all(h["genre"] == "cats" and h["duration_s"] > 3 for h in filtered)
    assert [h["id"] for h in filtered] == exact_top(
        rows, rows[7]["cls"], 5, keep=lambda r: r["genre"] == "cats" and r["duration_s"] > 3
    )

    got = index.get(["vid001", "nope"], with_vectors=True)
    assert list(got) == ["vid001"]
    np.testing.assert_allclose(got["vid001"]["cls"], rows[1]["cls"], rtol=1e-6)
    assert got["vid001"]["genre"] == "dogs"

    index.delete(["vid007", "vid008"])
    assert index.count() == 38
    assert "vid007" not in index.list_ids()
    again = index.search(rows[7]["cls"], 3, consistency_level="Strong")[0]
    assert "vid007" not in [h["id"] for h in again]
    assert len(index.list_ids()) == 38


def test_bad_requests_are_typed(milvus_uri: str, unique_collection: str) -> None:
    index = VideoIndex(milvus_uri, collection=unique_collection, dim=DIM)
    index.create()
    index.upsert(unit_rows(3))
    with pytest.raises(InvalidInputError):
        index.search(np.ones(DIM + 1), 3)
    with pytest.raises(InvalidInputError):
        index.search(np.full(DIM, np.nan), 3)
    with pytest.raises(InvalidInputError):
        index.search(np.ones(DIM), 0)
    with pytest.raises(InvalidInputError):
        index.search(np.ones(DIM), 3, filter="genre ==== 1")
    with pytest.raises(InvalidInputError):
        index.upsert([{"id": "../etc", "cls": np.ones(DIM)}])
    with pytest.raises(InvalidInputError):
        index.upsert([{"id": "ok", "cls": np.ones(DIM - 1)}])
    with pytest.raises(InvalidInputError):
        index.upsert(unit_rows(2) + unit_rows(1))  # duplicate id in one call
    with pytest.raises(InvalidInputError):
        index.delete("vid000")  # a bare string


def test_unknown_collection(milvus_uri: str) -> None:
    index = VideoIndex(milvus_uri, collection="no_such_collection_xyz", dim=DIM)
    with pytest.raises(NotFoundError, match="no_such_collection_xyz"):
        index.search(np.ones(DIM), 3)
    with pytest.raises(NotFoundError):
        index.count()


@pytest.mark.server
def test_lite_and_server_agree(milvus_lite_uri: str, milvus_server_uri: str) -> None:
    rows = unit_rows(200, seed=5)
    rng = np.random.default_rng(9)
    queries = rng.standard_normal((6, DIM)).astype(np.float32)
    results = {}
    for name, uri in (("lite", milvus_lite_uri), ("server", milvus_server_uri)):
        index = VideoIndex(uri, collection="t_agree", dim=DIM, fingerprint="fp")
        index.drop()
        index.create()
        index.upsert(rows)
        index.wait_until_indexed()
        results[name] = index.search(queries, 10, consistency_level="Strong")
        index.drop()
    for q in range(len(queries)):
        lite_ids = [h["id"] for h in results["lite"][q]]
        server_ids = [h["id"] for h in results["server"][q]]
        assert (
            lite_ids == server_ids == exact_top(rows, queries[q] / np.linalg.norm(queries[q]), 10)
        )
        np.testing.assert_allclose(
            [h["score"] for h in results["lite"][q]],
            [h["score"] for h in results["server"][q]],
            atol=1e-4,
        )


def test_milvus_setup_cli(
    milvus_uri: str, unique_collection: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from milvus_setup.cli import main

    def run(*args: str) -> tuple[int, str, str]:
        code = main([*args, "--uri", milvus_uri, "--collection", unique_collection])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    code, out, err = run("create", "--dim", str(DIM), "--fingerprint", "fp-cli")
    assert code == 0, err
    assert json.loads(out)["created"] is True
    code, out, err = run("describe")
    assert code == 0, err
    info = json.loads(out)
    assert info["dim"] == DIM and info["fingerprint"] == "fp-cli"
    assert run("check", "--dim", str(DIM), "--fingerprint", "fp-cli")[0] == 0
    code, out, _ = run("check", "--dim", str(DIM + 1))
    assert code == 1 and "dim" in out
    assert run("drop", "--yes")[0] == 0
    code, _, err = run("describe")
    assert code == 2 and "does not exist" in err
    assert run("create")[0] == 2  # no --dim


def test_milvus_setup_module_entry_point(tmp_path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "milvus_setup",
            "describe",
            "--uri",
            str(tmp_path / "x.db"),
            "--collection",
            "absent",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "absent" in done.stderr and "does not exist" in done.stderr


def test_iter_rows_pages(milvus_uri: str, unique_collection: str) -> None:
    index = VideoIndex(milvus_uri, collection=unique_collection, dim=DIM)
    index.create()
    rows = unit_rows(30)
    rows += [dict(rows[0], id="vid"), dict(rows[0], id="a-1"), dict(rows[0], id="Z.9")]
    index.upsert(rows)
    paged = [r["id"] for r in index.iter_rows(("id", "uri"), page_size=8)]
    assert paged == sorted(r["id"] for r in rows)  # complete, no duplicates, sorted
    assert index.list_ids() == paged and index.count() == len(rows)
