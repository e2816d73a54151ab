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
            if not isinstance(v, dict)
            or set(v) & reserved
            or any(k.startswith("$") or not k for k in v)  # empty names: issue 20
            or any(abs(i) >= 2**63 for i in v.values())  # outside int64: issue 20
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


# ----------------------------------------------------------------------------- round two (#20)
# metadata: any value is stored exactly (JSON without NaN/inf, ints within int64) or refused
_JSON_LEAVES = st.one_of(
    st.none(),
    st.booleans(),
    st.text(max_size=8),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([b"bytes", {1, 2}, object(), np.float32(1.5), 1j]),
)
_JSON_VALUES = st.recursive(
    _JSON_LEAVES,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.one_of(st.text(max_size=4), st.integers(0, 3)), inner, max_size=3),
    ),
    max_leaves=8,
)


@FAST
@given(st.dictionaries(st.text(min_size=1, max_size=6), _JSON_VALUES, max_size=3))
def test_metadata_is_stored_exactly_or_refused_typed(fields: dict) -> None:
    """NaN/inf (anywhere inside) used to be stored as null; other types failed untyped."""
    fields = {k: v for k, v in fields.items() if not k.startswith("$")}
    try:
        IngestOptions(metadata={"vid": fields})
    except InvalidInputError as exc:
        assert "\n" not in str(exc)
        return
    text = json.dumps(fields, allow_nan=False)  # what Milvus and the record keep
    assert all(abs(i) < 2**63 for i in _ints(fields))
    assert json.loads(text) == json.loads(json.dumps(fields))


def _ints(value):
    if isinstance(value, bool):
        return
    if isinstance(value, int):
        yield value
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _ints(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _ints(item)


@pytest.mark.parametrize(
    "metadata",
    [
        {"vid": {"rating": float("nan")}},
        {"vid": {"deep": [1, {"x": [float("-inf")]}]}},
        [{"vid": {"a": 1}}],
        {"vid": {"tags": {1, 2}}},
        {"vid": {"when": object()}},
    ],
    ids=["nan", "nested-inf", "list", "set", "object"],
)
def test_metadata_examples_refused_typed(metadata) -> None:
    with pytest.raises(InvalidInputError, match="metadata"):
        IngestOptions(metadata=metadata)


def test_unknown_ingest_option_is_typed_before_any_work() -> None:
    from tb_reranker.index.ingest import ingest

    # model/index/store are never touched: the options are checked first
    with pytest.raises(InvalidInputError, match="unknown ingest option 'bogus'.*batch_size"):
        ingest(["/nowhere"], model=None, index=None, store=None, bogus=1)


# file names: a name that makes no valid id fails alone; every message stays one line
@FAST
@given(
    st.lists(
        st.text(
            st.characters(blacklist_characters="/\x00", blacklist_categories=("Cs",)),
            min_size=1,
            max_size=30,
        ).filter(lambda n: n not in (".", "..")),
        min_size=1,
        max_size=6,
        unique=True,
    )
)
def test_any_file_name_is_ingested_or_fails_alone(names: list[str]) -> None:
    from tb_reranker.errors import printable
    from tb_reranker.index.inputs import assign_ids

    paths = [f"/lib/{name}.mp4" for name in names]
    try:
        videos, failed = assign_ids(paths)
    except InvalidInputError as exc:  # only two names making the same id
        assert "same video id" in str(exc) and "\n" not in str(exc)
        return
    assert sorted(p for _, p in videos) + sorted(p for p, _ in failed) == sorted(paths) or (
        sorted([p for _, p in videos] + [p for p, _ in failed]) == sorted(paths)
    )
    for video_id, path in videos:
        assert validate_video_id(video_id) == Path(path).stem
    for path, reason in failed:
        assert not VIDEO_ID_PATTERN.fullmatch(Path(path).stem) or ".." in Path(path).stem
        line = f"failed: {printable(path)}: {reason}"
        assert "\n" not in line and "\r" not in line and line.isprintable()


@FAST
@given(st.text(max_size=60))
def test_printable_is_one_printable_line(text: str) -> None:
    from tb_reranker.cli import _one_line
    from tb_reranker.errors import printable

    for shown in (printable(text), _one_line(text)):
        assert shown.isprintable()
        shown.encode("utf-8")  # never fails to print (surrogates escaped)
    if text.isprintable():
        assert printable(text) == text == _one_line(text)


# symlink loops: a walk or a glob visits each real directory once and ends
_TREE = st.tuples(
    st.lists(st.sampled_from(["a", "b", "a/c", "b/d", "a/c/e"]), max_size=5, unique=True),
    st.lists(
        st.tuples(
            st.sampled_from(["", "a", "b", "a/c", "b/d", "a/c/e"]),
            st.sampled_from(["..", "../..", ".", "../a", "../../b"]),
        ),
        max_size=4,
    ),
)


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(_TREE)
@pytest.mark.timeout(120)
def test_walks_and_globs_end_through_symlink_loops(tmp_path_factory, tree) -> None:
    """``tb ingest 'lib/**/*.mp4'`` with ``lib/a/up -> ..`` used to walk without end."""
    dirs, links = tree
    root = tmp_path_factory.mktemp("lib")
    videos = {root / "top.mp4"}
    for d in dirs:
        (root / d).mkdir(parents=True, exist_ok=True)
        videos.add(root / d / f"{d.replace('/', '_')}.mp4")
    for video in videos:
        video.parent.mkdir(parents=True, exist_ok=True)
        video.write_bytes(b"x")
    for i, (where, target) in enumerate(links):
        (root / where).mkdir(parents=True, exist_ok=True)
        if (root / where / target).resolve().is_relative_to(root.resolve()):  # inside the tree
            (root / where / f"up{i}").symlink_to(target)
    real = {str(v.resolve()) for v in videos}
    for inputs in ([str(root)], [str(root / "**" / "*.mp4")], [str(root / "**")]):
        paths, _ = expand_paths(inputs)
        found = [os.path.realpath(p) for p in paths]
        assert len(found) == len(set(found)) and set(found) == real, inputs


def test_glob_with_looping_links_example(tmp_path: Path) -> None:
    lib = tmp_path / "lib"
    (lib / "a" / "b").mkdir(parents=True)
    for name in ("lib/x.mp4", "lib/a/y.mp4", "lib/a/b/z.mp4"):
        (tmp_path / name).write_bytes(b"x")
    (lib / "a" / "up").symlink_to("..")
    (lib / "a" / "b" / "up").symlink_to("../..")
    (lib / "a" / "b" / "self").symlink_to(".")
    paths, problems = expand_paths([str(lib / "**" / "*.mp4"), str(lib)])
    assert sorted(paths) == sorted(str(lib / n) for n in ("x.mp4", "a/y.mp4", "a/b/z.mp4"))
    assert problems == []
