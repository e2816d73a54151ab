"""Hostile inputs to the storage layer, property-based (issue 10): ids, record bytes, tokens,
metadata and list files. Every outcome is a typed error or a faithful round trip; nothing
stored before is lost."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tb_reranker.errors import DataCorruptionError, InvalidInputError, StoreError
from tb_reranker.index.ingest import IngestOptions
from tb_reranker.index.inputs import expand_paths
from tb_reranker.stores import (
    VIDEO_ID_PATTERN,
    FrameRecord,
    LmdbFrameStore,
    decode_record,
    encode_record,
    validate_video_id,
)
from tb_reranker.wire.status import grpc_status_name

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def record(seed: int = 0, frames: int = 4, dim: int = 8) -> FrameRecord:
    rng = np.random.default_rng(seed)
    return FrameRecord(
        tokens=rng.standard_normal((frames, dim)).astype(np.float16),
        timestamps=np.arange(frames, dtype=np.float32),
        content_hash=f"h{seed}",
        uri=f"/v/{seed}.mp4",
        metadata={"seed": seed},
    )


# ----------------------------------------------------------------------------- ids
@FAST
@given(st.one_of(st.text(max_size=300), st.binary(max_size=40), st.integers(), st.none()))
def test_any_id_is_accepted_safely_or_refused_typed(value) -> None:
    try:
        video_id = validate_video_id(value)
    except InvalidInputError:
        return
    assert isinstance(video_id, str) and VIDEO_ID_PATTERN.fullmatch(video_id)
    assert not any(c in video_id for c in "/\\\x00") and ".." not in video_id


@FAST
@given(
    st.sampled_from(["../", "..\\", "/", "\x00", "..", " ", "\n", "é", "$", "*"]),
    st.text(alphabet="abc123", min_size=1, max_size=10),
)
def test_traversal_and_odd_characters_refused(bad: str, stem: str) -> None:
    for video_id in (bad + stem, stem + bad, stem + bad + stem):
        with pytest.raises(InvalidInputError):
            validate_video_id(video_id)


# ----------------------------------------------------------------------------- record bytes
@FAST
@given(st.binary(max_size=2048))
def test_random_bytes_are_a_typed_data_error(data: bytes) -> None:
    with pytest.raises(DataCorruptionError, match="'vid'") as caught:
        decode_record("vid", data)
    assert grpc_status_name(caught.value) == "DATA_LOSS" and not caught.value.retriable


_GOOD = encode_record(record(1))


@FAST
@given(st.lists(st.tuples(st.integers(0, len(_GOOD) - 1), st.integers(0, 255)), max_size=8))
def test_mutated_record_decodes_finite_or_is_a_typed_data_error(edits) -> None:
    data = bytearray(_GOOD)
    for position, value in edits:
        data[position] = value
    try:
        decoded = decode_record("vid", bytes(data))
    except DataCorruptionError:
        return
    assert np.isfinite(decoded.tokens).all() and np.isfinite(decoded.timestamps).all()


@FAST
@given(st.integers(0, len(_GOOD)))
def test_truncated_record_is_a_typed_data_error(cut: int) -> None:
    if cut == len(_GOOD):
        decode_record("vid", _GOOD)
        return
    with pytest.raises(DataCorruptionError):
        decode_record("vid", _GOOD[:cut])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, 1e6])
def test_non_finite_tokens_refused_on_write_and_found_on_read(tmp_path: Path, bad: float) -> None:
    """1e6 overflows float16 (inf). Writes refuse them; bytes damaged on disk are found."""
    tokens = np.zeros((4, 8), dtype=np.float32)
    tokens[1, 2] = bad
    poisoned = FrameRecord(tokens, np.arange(4, dtype=np.float32), "h")
    with LmdbFrameStore(tmp_path / "s") as store:
        store.put_many({"keep": record(0)})
        with pytest.raises(InvalidInputError, match="NaN/inf"):
            store.put_many({"keep": record(5), "bad": poisoned})  # all or nothing
        assert sorted(store.list_ids()) == ["keep"]
        np.testing.assert_array_equal(store.get("keep").tokens, record(0).tokens)
        raw = bytearray(encode_record(record(2), dtype=np.float32))
        header_len = int.from_bytes(raw[:8], "little")
        begin = 8 + header_len
        raw[begin : begin + 4] = np.float32(bad if not np.isfinite(bad) else np.nan).tobytes()
        with store._env.begin(write=True) as txn:
            txn.put(b"rotten", bytes(raw))
        with pytest.raises(DataCorruptionError, match="'rotten'.*NaN/inf"):
            store.get_many(["keep", "rotten"])
        assert store.get("keep") is not None  # the others still read
        scan = store.scan()
        assert scan.ok == ["keep"] and list(scan.corrupt) == ["rotten"] and not scan.damage


def test_nan_timestamps_are_corruption() -> None:
    raw = bytearray(encode_record(record(3)))
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + header_len])
    begin = 8 + header_len + header["timestamps"]["data_offsets"][0]
    raw[begin : begin + 4] = np.float32(np.nan).tobytes()
    with pytest.raises(DataCorruptionError, match="timestamps"):
        decode_record("t", bytes(raw))


# ----------------------------------------------------------------------------- round trips
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    st.dictionaries(
        st.from_regex(VIDEO_ID_PATTERN, fullmatch=True).filter(lambda s: ".." not in s),
        st.tuples(st.integers(1, 6), st.integers(0, 2**31)),
        min_size=1,
        max_size=6,
    ),
    st.dictionaries(
        st.text(min_size=1, max_size=12),
        st.recursive(
            st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=20),
            lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
            max_leaves=5,
        ),
        max_size=4,
    ),
)
def test_store_round_trip_is_exact(tmp_path_factory, entries, metadata) -> None:
    path = tmp_path_factory.mktemp("rt")
    records = {}
    for video_id, (frames, seed) in entries.items():
        rng = np.random.default_rng(seed)
        records[video_id] = FrameRecord(
            tokens=rng.standard_normal((frames, 4)).astype(np.float16),
            timestamps=np.arange(frames, dtype=np.float32),
            content_hash=str(seed),
            metadata=metadata or None,
        )
    with LmdbFrameStore(path) as store:
        store.put_many(records)
        back = store.get_many(list(records) + ["absent-id"])
        assert set(back) == set(records)
        for video_id, original in records.items():
            np.testing.assert_array_equal(back[video_id].tokens, original.tokens)
            assert back[video_id].metadata == original.metadata
            assert back[video_id].content_hash == original.content_hash


@FAST
@given(
    st.dictionaries(
        st.text(max_size=10),
        st.one_of(st.dictionaries(st.text(max_size=8), st.integers()), st.integers(), st.text()),
        max_size=4,
    )
)
def test_metadata_shape_checked_typed(metadata) -> None:
    reserved = {"id", "cls", "uri", "duration_s", "num_frames", "content_hash", "score"}
    try:
        options = IngestOptions(metadata=metadata)  # checked once, where ingest's options are built
    except InvalidInputError:
        bad = [
            v
            for v in metadata.values()
            if not isinstance(v, dict) or set(v) & reserved or any(k.startswith("$") for k in v)
        ]
        assert bad
        return
    for key, value in metadata.items():
        assert isinstance(value, dict) and not set(value) & reserved
        assert options.metadata_for(key, "/no/such/path") == (value or {})


@pytest.mark.parametrize(
    "bad",
    [
        {"batch_size": 0},
        {"workers": 0},
        {"batch_size": True},
        {"workers": "2"},
        {"batch_size": 2.5},
    ],
)
def test_ingest_options_refuse_bad_sizes(bad) -> None:
    with pytest.raises(InvalidInputError):
        IngestOptions(**bad)


# ----------------------------------------------------------------------------- list files
def test_list_file_hostile_shapes(tmp_path: Path) -> None:
    video = tmp_path / "a.mp4"
    video.write_bytes(b"x")
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    comments = tmp_path / "comments.txt"
    comments.write_text("# nothing\n\n   \n")
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    loop = tmp_path / "loop.txt"
    loop.write_text(f"@{loop.name}\n{video.name}\n")
    fifo = tmp_path / "fifo.txt"
    os.mkfifo(fifo)
    for item, reason in [
        (empty, "holds no entries"),
        (comments, "holds no entries"),
        (binary, "cannot read list file"),
        (fifo, "not a regular file"),
        (tmp_path / "missing.txt", "cannot read list file"),
    ]:
        paths, problems = expand_paths([f"@{item}"])
        assert paths == [] and len(problems) == 1 and reason in problems[0][1], (item, problems)
    paths, problems = expand_paths([f"@{loop}"])
    assert paths == [str(video)] and "includes itself" in problems[0][1]


def test_store_errors_are_typed_on_closed_and_missing(tmp_path: Path) -> None:
    store = LmdbFrameStore(tmp_path / "s")
    store.close()
    with pytest.raises(StoreError, match="closed"):
        store.get_many(["a"])
    with pytest.raises(StoreError, match="does not exist"):
        LmdbFrameStore(tmp_path / "nowhere", readonly=True)
    (tmp_path / "file").write_text("not a dir")
    with pytest.raises(StoreError):
        LmdbFrameStore(tmp_path / "file")


@settings(max_examples=200, deadline=None)
@given(
    bits=st.lists(st.integers(0, 0xFFFF), min_size=0, max_size=64),
    special=st.sampled_from([None, 0x7C00, 0xFC00, 0x7E00, 0xFFFF, 0x7BFF, 0xFBFF, 0x0001]),
)
def test_float16_finiteness_from_the_bits_equals_numpy(bits: list[int], special) -> None:
    """The bit test the store's decoder uses on float16 tokens (issue 12) agrees with
    ``np.isfinite`` on any half-precision pattern: ±inf, quiet/signalling NaN, the largest
    finite values, subnormals."""
    from tb_reranker.stores.record import all_finite

    values = np.array(bits + ([special] if special is not None else []), dtype=np.uint16)
    halves = values.view(np.float16).reshape(-1, 1)
    assert all_finite(halves) == bool(np.isfinite(halves).all())
    assert all_finite(halves.astype(np.float32)) == bool(np.isfinite(halves).all())
