"""Segment keys, segment fields of frame records and Milvus rows (issue 22 §2, sections A-C)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tb_reranker.errors import DataCorruptionError, InvalidInputError
from tb_reranker.index.entities import OUTPUT_FIELDS, ROW_FIELDS, flatten, prepare_rows
from tb_reranker.index.rows import check_metadata, video_row
from tb_reranker.index.schema import SEGMENT_FIELDS
from tb_reranker.stores import (
    FrameRecord,
    LmdbFrameStore,
    decode_record,
    encode_record,
    segment_key,
    split_key,
    validate_record_key,
    validate_video_id,
)

video_ids = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,40}", fullmatch=True).filter(
    lambda s: ".." not in s
)


def record(**kw: object) -> FrameRecord:
    rng = np.random.default_rng(0)
    return FrameRecord(
        tokens=rng.standard_normal((4, 8)).astype(np.float32),
        timestamps=np.array([31.0, 33.0, 35.0, 37.0], dtype=np.float32),
        content_hash="sha256:abc",
        uri="/v/long.mp4",
        duration_s=95.0,
        **kw,  # type: ignore[arg-type]
    )


# ---------------------------------------------------------------- A. keys
@given(video_ids, st.integers(0, 99_999))
def test_segment_key_round_trip(video_id: str, n: int) -> None:
    key = segment_key(video_id, n)
    assert split_key(key) == (video_id, n)
    assert validate_record_key(key) == key
    assert (key == video_id) == (n == 0)  # a one-segment video keeps its id as its key


@given(video_ids, st.text(min_size=0, max_size=8))
def test_bad_suffixes_are_refused(video_id: str, suffix: str) -> None:
    """Only '~' + 1..99999 without a leading zero follows a video id: one key per segment."""
    key = f"{video_id}~{suffix}"
    valid = suffix.isascii() and suffix.isdigit() and suffix[0] != "0" and int(suffix) < 100_000
    if valid:
        assert split_key(key) == (video_id, int(suffix))
    else:
        with pytest.raises(InvalidInputError):
            validate_record_key(key)


@pytest.mark.parametrize("key", ["a~0", "a~01", "a~", "a~100000", "~1", "a~1~2", "a~-1", "../x~1"])
def test_bad_keys(key: str) -> None:
    with pytest.raises(InvalidInputError):
        validate_record_key(key)
    with pytest.raises(InvalidInputError):
        split_key(key)


def test_video_ids_still_refuse_the_separator() -> None:
    with pytest.raises(InvalidInputError):
        validate_video_id("a~1")  # delete and the SDK take video ids, never keys
    for bad in (-1, 100_000, True, 1.0):
        with pytest.raises(InvalidInputError):
            segment_key("a", bad)  # type: ignore[arg-type]


# ---------------------------------------------------------------- C. records
def test_segment_record_round_trip() -> None:
    rec = record(segment=3, start_s=30.0, end_s=40.0, segments=7)
    back = decode_record("v~3", encode_record(rec))
    assert (back.segment, back.start_s, back.end_s, back.segments) == (3, 30.0, 40.0, 7)
    assert back.end == 40.0
    np.testing.assert_array_equal(back.timestamps, rec.timestamps)  # absolute seconds


def _old_bytes(rec: FrameRecord) -> bytes:
    """A record as the code before segments wrote it (its metadata keys, nothing else)."""
    from safetensors.numpy import save

    tensors = {
        "tokens": rec.tokens.astype(np.float16),
        "timestamps": rec.timestamps.astype(np.float32),
    }
    metadata = {
        "content_hash": rec.content_hash,
        "tb_format": "frame_record/1",
        "uri": rec.uri,
        "duration_s": repr(float(rec.duration_s)),
        "fingerprint": rec.fingerprint,
        "metadata": json.dumps({"a": 1}, sort_keys=True),
    }
    return save(tensors, metadata=metadata)


def _header_metadata(data: bytes) -> dict:
    length = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + length])["__metadata__"]


def test_old_records_read_as_the_whole_video(tmp_path: Path) -> None:
    old = _old_bytes(record())
    back = decode_record("v", old)
    assert (back.segment, back.start_s, back.end_s, back.segments) == (0, 0.0, None, 1)
    assert back.end == 95.0
    # a whole-video record is written as before: the same metadata, no segment keys
    assert _header_metadata(encode_record(back)) == _header_metadata(old)
    import lmdb

    env = lmdb.open(str(tmp_path / "frames"), subdir=True, map_size=1 << 20)
    with env.begin(write=True) as txn:  # an entry the old code left
        txn.put(b"v", old)
    env.close()
    with LmdbFrameStore(tmp_path / "frames", map_size=1 << 20) as store:
        got = store.get_many(["v"])["v"]
        assert (got.segment, got.segments, got.end) == (0, 1, 95.0)


@pytest.mark.parametrize(
    "fields",
    [
        {"segment": 1, "segments": 1},
        {"segment": -1, "segments": 2},
        {"segments": 0},
        {"segment": 1.0, "segments": 2},
        {"start_s": -1.0},
        {"start_s": float("nan")},
        {"start_s": 5.0, "end_s": 4.0},
        {"end_s": float("inf")},
    ],
)
def test_bad_segment_fields(fields: dict) -> None:
    with pytest.raises(InvalidInputError):
        record(**fields)


def test_damaged_segment_metadata_is_corruption() -> None:
    data = encode_record(record(segment=1, start_s=10.0, end_s=20.0, segments=2))
    damaged = data.replace(b'"segments":"2"', b'"segments":"x"')
    assert damaged != data
    with pytest.raises(DataCorruptionError):
        decode_record("v~1", damaged)


def test_store_takes_segment_keys(tmp_path: Path) -> None:
    with LmdbFrameStore(tmp_path / "frames", map_size=1 << 20) as store:
        store.put_many({"v": record(segments=2, end_s=30.0), "v~1": record(segment=1, segments=2)})
        assert sorted(store.list_ids()) == ["v", "v~1"]
        assert store.contains("v~1")
        assert store.get_many(["v~1"])["v~1"].segment == 1
        with pytest.raises(InvalidInputError):
            store.put_many({"v~0": record()})
        store.delete_many(["v~1"])
        assert list(store.list_ids()) == ["v"]
        scan = store.scan()
        assert sorted(scan.ok) == ["v"] and not scan.bad_keys


# ---------------------------------------------------------------- B. rows
def test_segment_fields_are_row_fields_and_reserved() -> None:
    assert SEGMENT_FIELDS == ("video_id", "segment", "start_s", "end_s")
    assert set(SEGMENT_FIELDS) <= set(ROW_FIELDS) and set(SEGMENT_FIELDS) <= set(OUTPUT_FIELDS)
    for name in SEGMENT_FIELDS:
        with pytest.raises(InvalidInputError, match="reserved"):
            check_metadata({"v": {name: 1}})


def test_video_row_of_a_segment() -> None:
    rec = record(segment=3, start_s=30.0, end_s=40.0, segments=7)
    row = video_row("v~3", rec, np.ones(8), {"genre": "x"})
    assert row["id"] == "v~3" and row["video_id"] == "v" and row["segment"] == 3
    assert (row["start_s"], row["end_s"], row["duration_s"]) == (30.0, 40.0, 95.0)
    assert row["genre"] == "x"
    whole = video_row("w", record(), np.ones(8), None)
    assert (whole["video_id"], whole["segment"], whole["start_s"], whole["end_s"]) == (
        "w",
        0,
        0.0,
        95.0,
    )
    with pytest.raises(InvalidInputError):
        video_row("v~2", rec, np.ones(8), None)  # the key and the record disagree


def test_prepare_rows_fills_and_checks_segment_fields() -> None:
    (row,) = prepare_rows([{"id": "v~2", "cls": np.ones(4), "duration_s": 50.0}], 4)
    assert (row["video_id"], row["segment"], row["start_s"], row["end_s"]) == ("v", 2, 0.0, 50.0)
    for bad in ({"video_id": "w"}, {"segment": 1}, {"start_s": 9.0, "end_s": 3.0}):
        with pytest.raises(InvalidInputError):
            prepare_rows([{"id": "v~2", "cls": np.ones(4), "duration_s": 50.0, **bad}], 4)
    with pytest.raises(InvalidInputError):
        prepare_rows([{"id": "v~0", "cls": np.ones(4)}], 4)


def test_flatten_reads_an_old_row_as_segment_zero() -> None:
    old = flatten({"id": "v", "duration_s": 12.5, "$meta": {"genre": "x"}})
    assert old == {
        "id": "v",
        "duration_s": 12.5,
        "genre": "x",
        "video_id": "v",
        "segment": 0,
        "start_s": 0.0,
        "end_s": 12.5,
    }
    dynamic = flatten(  # a schema-1 collection: the segment fields are dynamic
        {
            "id": "v~1",
            "duration_s": 50.0,
            "$meta": {"video_id": "v", "segment": 1, "start_s": 20.0, "end_s": 40.0},
        }
    )
    assert (dynamic["video_id"], dynamic["segment"], dynamic["end_s"]) == ("v", 1, 40.0)
