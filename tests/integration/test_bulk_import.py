"""BulkImport (tb_reranker.index.bulk) against the real local Milvus 2.3.5 server and Milvus Lite.

Rows are what ingest writes (``video_row`` of segment records); a bulk-imported collection must
read back as an upsert-filled one, a rejected import must leave the collection as it was, and
Milvus Lite must be refused with a typed error.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tb_reranker.errors import BulkImportError, InvalidInputError
from tb_reranker.index import VideoIndex
from tb_reranker.index.bulk import BulkImport
from tb_reranker.index.rows import video_row
from tb_reranker.stores import FrameRecord, segment_key

DIM = 16
SEGMENTS = 3


def segment_rows(videos: int, seed: int = 0, prefix: str = "clip") -> list[dict]:
    """``videos`` videos of SEGMENTS segments each, as ``video_row`` makes their rows."""
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((videos * SEGMENTS, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    rows = []
    for v in range(videos):
        video_id = f"{prefix}{v:04d}"
        for s in range(SEGMENTS):
            record = FrameRecord(
                tokens=np.zeros((4, DIM), np.float16),
                timestamps=np.linspace(2.0 * s, 2.0 * s + 1.5, 4, dtype=np.float32),
                content_hash=f"sha256:{v:064x}",
                uri=f"/videos/{video_id}.mp4",
                duration_s=2.0 * SEGMENTS,
                segment=s,
                start_s=2.0 * s,
                end_s=2.0 * s + 2.0,
                segments=SEGMENTS,
            )
            metadata = {"genre": "cats" if v % 2 else "dogs", "rank": v, "tags": ["a", str(s)]}
            key = segment_key(video_id, s)
            rows.append(video_row(key, record, vectors[v * SEGMENTS + s], metadata))
    return rows


@pytest.fixture
def staging(milvus_server) -> Path:
    """Where the local-storage test server reads import files: under its storage root."""
    return Path(milvus_server.base_dir) / "data" / "bulk"


@pytest.fixture
def collections(milvus_server_uri: str, unique_collection: str):
    """Two fresh collections (bulk, upsert); dropped afterwards."""
    made = []

    def make(suffix: str, dim: int = DIM) -> VideoIndex:
        index = VideoIndex(milvus_server_uri, collection=f"{unique_collection}_{suffix}", dim=dim)
        index.drop()
        index.create()
        made.append(index)
        return index

    yield make
    for index in made:
        index.drop()
        index.close()


def _same_rows(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        left, right = dict(a[key]), dict(b[key])
        np.testing.assert_array_equal(left.pop("cls"), right.pop("cls"))
        assert left == right, key


@pytest.mark.server
@pytest.mark.parametrize("file_format", ["numpy", "parquet"])
def test_bulk_import_reads_back_like_upserts(collections, staging: Path, file_format: str) -> None:
    rows = segment_rows(100)  # 300 rows
    bulk, upserted = collections("bulk"), collections("upsert")
    upserted.upsert(rows)
    seen: list[tuple[int, int]] = []
    with BulkImport(
        bulk,
        staging=staging,
        rows_per_file=128,
        lookup_rows=100,
        poll_interval=0.2,
        file_format=file_format,
    ) as sink:
        assert sink.add(rows[:150]) == 150
        assert sink.add(rows[150:]) == 150
        assert len(sink.staged_files) == 2  # 128 rows each so far; the rest at commit
        if file_format == "numpy":  # a folder per job, a .npy file per field
            assert all((Path(f) / "cls.npy").is_file() for f in sink.staged_files)
        else:
            assert all(Path(f).is_file() for f in sink.staged_files)
        assert bulk.count() == 0  # nothing imported before the commit
        assert sink.commit(progress=lambda done, total: seen.append((done, total))) == 300
        staged_dir = Path(sink.staging)
    assert not staged_dir.exists()  # staged files removed
    assert seen and seen[-1] == (300, 300)
    assert bulk.count() == upserted.count() == 300
    ids = [row["id"] for row in rows]
    _same_rows(bulk.get(ids, with_vectors=True), upserted.get(ids, with_vectors=True))
    one = bulk.get(["clip0007~2"])["clip0007~2"]
    assert (one["video_id"], one["segment"], one["genre"], one["tags"]) == (
        "clip0007",
        2,
        "cats",
        ["a", "2"],
    )
    bulk.wait_until_indexed()
    upserted.wait_until_indexed()
    query = np.stack([rows[5]["cls"], rows[77]["cls"]])
    for a, b in zip(
        bulk.search(query, 10, consistency_level="Strong"),
        upserted.search(query, 10, consistency_level="Strong"),
        strict=True,
    ):
        assert [h["id"] for h in a] == [h["id"] for h in b]
        np.testing.assert_allclose([h["score"] for h in a], [h["score"] for h in b], atol=1e-5)
    assert bulk.search(query, 1, consistency_level="Strong")[0][0]["id"] == rows[5]["id"]


@pytest.mark.server
def test_reimport_upserts_ids_that_exist(collections, staging: Path) -> None:
    index = collections("again")
    first = segment_rows(20)  # 60 rows
    with BulkImport(index, staging=staging, poll_interval=0.2) as sink:
        sink.add(first)
        assert sink.commit() == 60
    changed = [dict(row, genre="birds") for row in first[:9]]
    new = segment_rows(5, seed=1, prefix="new")  # 15 rows
    with BulkImport(index, staging=staging, poll_interval=0.2) as sink:
        sink.add(changed + new)
        assert sink.commit() == 24
        assert sink.updates == 9
    assert index.count() == 75  # no second row for a re-imported id
    got = index.get([row["id"] for row in changed + new])
    assert {got[row["id"]]["genre"] for row in changed} == {"birds"}
    assert len(got) == 24


@pytest.mark.server
def test_rejected_file_leaves_collection_as_it_was(collections, staging: Path) -> None:
    index = collections("rejected")
    before = segment_rows(10, seed=2, prefix="old")
    index.upsert(before)
    rows = segment_rows(30, seed=3)  # 90 rows: files of 40, 40, 10
    sink = BulkImport(index, staging=staging, rows_per_file=40, lookup_rows=10, poll_interval=0.2)
    sink.add(rows)
    (Path(sink.staged_files[1]) / "cls.npy").write_bytes(b"not a numpy file")  # damaged on disk
    with pytest.raises(BulkImportError, match=r"rejected.*1 of 3 jobs.*\b2: ") as info:
        sink.commit()
    assert not info.value.retriable
    assert index.count() == 30  # the two jobs that completed were rolled back
    assert index.get([row["id"] for row in rows]) == {}
    assert set(index.get([row["id"] for row in before])) == {row["id"] for row in before}
    assert not Path(sink.staging).exists()


@pytest.mark.server
def test_wrong_dimension_is_rejected_by_the_server(
    collections, staging: Path, milvus_server_uri: str
) -> None:
    index = collections("dim")
    # a sink opened by name (its dim read from the collection), as a CLI would
    sink = BulkImport.open(milvus_server_uri, index.collection, staging=staging, poll_interval=0.2)
    sink.add(segment_rows(4))  # 16-d vectors staged
    # the collection is replaced by a 32-d one before the commit: the server reads 16-d rows
    index.drop()
    wider = VideoIndex(milvus_server_uri, collection=index.collection, dim=32)
    wider.create()
    with pytest.raises(BulkImportError, match="irregular|dimension"):
        sink.commit()
    assert wider.count() == 0


@pytest.mark.server
def test_add_checks_rows_and_abort_removes_files(collections, staging: Path) -> None:
    index = collections("checks")
    sink = BulkImport(index, staging=staging, rows_per_file=5, lookup_rows=5)
    rows = segment_rows(4)
    sink.add(rows[:6])
    with pytest.raises(InvalidInputError, match="added to this bulk import before"):
        sink.add(rows[5:7])
    with pytest.raises(InvalidInputError, match=r"shape \[16\]"):
        sink.add([dict(rows[8], cls=np.ones(8, np.float32))])
    with pytest.raises(InvalidInputError, match="NaN"):
        sink.add([dict(rows[8], cls=np.full(DIM, np.nan, np.float32))])
    files = sink.staged_files
    assert files and all(Path(f).exists() for f in files)
    sink.abort()
    assert not any(Path(f).exists() for f in files)
    assert not Path(sink.staging).exists()
    with pytest.raises(InvalidInputError, match="committed or aborted"):
        sink.commit()
    assert index.count() == 0


def test_lite_has_no_bulk_import(milvus_lite_uri: str, unique_collection: str, tmp_path) -> None:
    index = VideoIndex(milvus_lite_uri, collection=unique_collection, dim=DIM)
    with pytest.raises(InvalidInputError, match="Milvus Lite has no bulk import.*drop --bulk"):
        BulkImport(index, staging=tmp_path)
    with pytest.raises(InvalidInputError, match="drop --bulk"):
        BulkImport.open(str(tmp_path / "x.db"), "tb_videos", staging=tmp_path)
    assert list(tmp_path.iterdir()) == []  # nothing staged, no database opened
