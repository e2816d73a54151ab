"""Frame-token store: LMDB backend round trips, atomicity, id safety, corruption; S3 via moto."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from tb_reranker.errors import InvalidInputError, StoreError
from tb_reranker.stores import (
    FrameRecord,
    LmdbFrameStore,
    encode_record,
    open_store,
    validate_video_id,
)

BAD_IDS = ["../x", "/abs", "a/b", "", "a" * 256, "a\x00b", "..", "a..b", ".hidden", "a\\b", "a b"]


def make_record(seed: int = 0, frames: int = 4, dim: int = 8, **kw: object) -> FrameRecord:
    rng = np.random.default_rng(seed)
    return FrameRecord(
        tokens=rng.standard_normal((frames, dim)).astype(np.float32),
        timestamps=np.arange(frames, dtype=np.float32) * 0.5,
        content_hash=f"hash{seed}",
        **kw,  # type: ignore[arg-type]
    )


@pytest.fixture
def store(tmp_path: Path):
    with LmdbFrameStore(tmp_path / "frames", map_size=1 << 20) as s:
        yield s


def test_round_trip_fp16(store: LmdbFrameStore) -> None:
    rec = make_record(1, mask=np.array([True, True, True, False]), uri="/v/a.mp4", duration_s=2.5)
    store.put_many({"vid-1": rec})
    got = store.get_many(["vid-1", "missing"])
    assert list(got) == ["vid-1"]
    out = got["vid-1"]
    assert out.tokens.dtype == np.float16 and out.tokens.shape == (4, 8)
    np.testing.assert_allclose(out.tokens, rec.tokens, atol=2e-3)
    np.testing.assert_array_equal(out.timestamps, rec.timestamps)
    assert out.content_hash == "hash1" and out.uri == "/v/a.mp4" and out.duration_s == 2.5
    assert out.mask is not None and out.mask.tolist() == [True, True, True, False]
    assert out.num_real_frames == 3


def test_float32_store_is_exact(tmp_path: Path) -> None:
    rec = make_record(2, metadata={"tag": "x", "n": 3})
    with open_store(tmp_path / "f32", dtype="float32") as store:
        store.put_many({"a": rec})
        out = store.get_many(["a"])["a"]
    assert out.tokens.dtype == np.float32
    np.testing.assert_array_equal(out.tokens, rec.tokens)
    assert out.metadata == {"tag": "x", "n": 3}


def test_list_contains_delete_len(store: LmdbFrameStore) -> None:
    store.put_many({f"v{i}": make_record(i) for i in range(5)})
    assert len(store) == 5
    assert sorted(store.list_ids()) == [f"v{i}" for i in range(5)]
    assert store.contains("v3") and "v3" in store and "v9" not in store
    assert store.delete_many(["v3", "v4", "nope"]) == 2
    assert sorted(store.list_ids()) == ["v0", "v1", "v2"]
    assert not store.contains("v3")
    store.put_many({"v0": make_record(42)})  # replace
    assert store.get_many(["v0"])["v0"].content_hash == "hash42"
    assert len(store) == 3


def test_put_many_is_atomic(store: LmdbFrameStore) -> None:
    store.put_many({"keep": make_record(0)})
    bad = {"a": make_record(1), "b": make_record(2), "../evil": make_record(3)}
    with pytest.raises(InvalidInputError):
        store.put_many(bad)
    nan = make_record(4)
    nan.tokens[0, 0] = np.nan
    with pytest.raises(InvalidInputError):
        store.put_many({"c": make_record(5), "d": nan})
    assert sorted(store.list_ids()) == ["keep"]


def test_map_grows_when_full(tmp_path: Path) -> None:
    with LmdbFrameStore(tmp_path / "small", map_size=64 * 1024) as store:
        records = {f"v{i:03d}": make_record(i, frames=12, dim=512) for i in range(40)}
        store.put_many(records)  # ~480 KB > 64 KB map
        assert len(store) == 40
        assert store.get_many(["v039"])["v039"].tokens.shape == (12, 512)


@pytest.mark.parametrize("bad", BAD_IDS)
def test_unsafe_ids_rejected(store: LmdbFrameStore, bad: str) -> None:
    with pytest.raises(InvalidInputError):
        validate_video_id(bad)
    with pytest.raises(InvalidInputError):
        store.put_many({bad: make_record()})
    with pytest.raises(InvalidInputError):
        store.get_many([bad])
    with pytest.raises(InvalidInputError):
        store.delete_many([bad])
    assert len(store) == 0


def test_good_ids_accepted() -> None:
    for good in ["a", "A9", "vid_1.mp4", "yt:abc-DEF_123", "x" * 255, "0"]:
        assert validate_video_id(good) == good
    with pytest.raises(InvalidInputError):
        validate_video_id(123)  # type: ignore[arg-type]


def test_corrupt_entry_names_id(store: LmdbFrameStore) -> None:
    store.put_many({"good": make_record(0)})
    with store._env.begin(write=True) as txn:  # damage the bytes behind the store's back
        txn.put(b"bad", b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
        txn.put(b"trunc", encode_record(make_record(1))[:40])
    with pytest.raises(StoreError, match="'bad'"):
        store.get_many(["good", "bad"])
    with pytest.raises(StoreError, match="'trunc'"):
        store.get_many(["trunc"])
    assert store.get_many(["good"])["good"].content_hash == "hash0"


def test_record_validation() -> None:
    with pytest.raises(InvalidInputError):
        FrameRecord(np.zeros(4, np.float16), np.zeros(4, np.float32), "h")
    with pytest.raises(InvalidInputError):
        FrameRecord(np.zeros((4, 2), np.float16), np.zeros(3, np.float32), "h")
    with pytest.raises(InvalidInputError):
        FrameRecord(np.zeros((4, 2), np.int32), np.zeros(4, np.float32), "h")


def test_video_cls_is_normalised_masked_mean() -> None:
    rec = make_record(3, mask=np.array([True, False, True, True]))
    expected = rec.tokens[[0, 2, 3]].mean(0)
    expected /= np.linalg.norm(expected)
    np.testing.assert_allclose(rec.video_cls(), expected, rtol=1e-6)


def test_open_store_specs(tmp_path: Path) -> None:
    with open_store(str(tmp_path / "dir")) as s:
        assert isinstance(s, LmdbFrameStore)
    with pytest.raises(InvalidInputError):
        open_store("")
    with pytest.raises(InvalidInputError):
        open_store("gs://bucket/x")
    with pytest.raises(InvalidInputError):
        open_store(tmp_path / "x", dtype="int8")


def test_closed_store_raises(tmp_path: Path) -> None:
    store = LmdbFrameStore(tmp_path / "c")
    store.close()
    with pytest.raises(StoreError):
        store.get_many(["a"])


def test_store_never_writes_outside_dir(tmp_path: Path) -> None:
    root = tmp_path / "root"
    with LmdbFrameStore(root) as store:
        for bad in BAD_IDS:
            with pytest.raises(InvalidInputError):
                store.put_many({bad: make_record()})
    assert sorted(os.listdir(tmp_path)) == ["root"]
    assert sorted(os.listdir(root)) == ["data.mdb", "lock.mdb"]


_GROW_MAP = """
import sys
import numpy as np
from tb_reranker.stores import FrameRecord, LmdbFrameStore
rng = np.random.default_rng(0)
with LmdbFrameStore(sys.argv[1], map_size=1 << 20) as store:
    for batch in range(int(sys.argv[2])):
        store.put_many({
            f"grown-{batch}-{n}": FrameRecord(
                tokens=rng.standard_normal((16, 256)).astype(np.float32),
                timestamps=np.arange(16, dtype=np.float32),
                content_hash="h",
            )
            for n in range(40)
        })
    print(store._env.info()["map_size"])
"""


def _grow_in_another_process(path: Path, batches: int) -> int:
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", _GROW_MAP, str(path), str(batches)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return int(done.stdout)


def test_map_grown_by_another_process_is_adopted(tmp_path: Path) -> None:
    """Before: once a concurrent ingest (another process) grew the map, every read and write
    of this store raised StoreError MDB_MAP_RESIZED until the process restarted."""
    path = tmp_path / "frames"
    with LmdbFrameStore(path, map_size=1 << 20) as store:
        store.put_many({"mine": make_record(1)})
        grown = _grow_in_another_process(path, batches=3)  # 3 x 40 x 8 KiB: past 1 MiB
        assert grown > 1 << 20
        assert list(store.get_many(["mine", "grown-2-39"])) == ["mine", "grown-2-39"]
        assert store.contains("grown-0-0") and len(list(store.list_ids())) == 121
        store.put_many({"after": make_record(2)})
        _grow_in_another_process(path, batches=12)  # again, while this one has grown too
        store.delete_many(["after"])
        assert len(store.get_many([f"grown-11-{n}" for n in range(40)])) == 40


def test_map_resize_waits_for_open_readers(tmp_path: Path) -> None:
    """Threads read while another process grows the map: the size is adopted only with no
    transaction of this process open, and every read answers."""
    import threading

    path = tmp_path / "frames"
    errors: list[BaseException] = []
    stop = threading.Event()
    with LmdbFrameStore(path, map_size=1 << 20) as store:
        store.put_many({f"v{n}": make_record(n) for n in range(8)})

        def read() -> None:
            while not stop.is_set():
                try:
                    assert len(store.get_many([f"v{n}" for n in range(8)])) == 8
                except BaseException as exc:  # noqa: BLE001 - reported below
                    errors.append(exc)
                    return

        readers = [threading.Thread(target=read) for _ in range(4)]
        for reader in readers:
            reader.start()
        try:
            _grow_in_another_process(path, batches=6)
            store.get_many(["v0"])  # at least one begin after the resize
        finally:
            stop.set()
            for reader in readers:
                reader.join(30)
    assert errors == []
