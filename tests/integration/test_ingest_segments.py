"""Long videos ingested as one record and one Milvus row per segment (issue 22 §2), on Milvus
Lite and the 2.3.5 server: rows and records with the right keys and spans, short clips unchanged,
a changed file with fewer segments, a crash in the middle of a video's write, delete, check and
repair, and a collection made before segments (schema 1)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tb_reranker.index import VideoIndex, check, delete, ingest
from tb_reranker.index import schema as milvus_schema
from tb_reranker.index.rows import video_rows
from tb_reranker.stores import LmdbFrameStore

COLOURS = [(230, 30, 30), (30, 200, 40), (40, 60, 220), (240, 220, 30), (200, 40, 200)]


def write_shots(path: Path, seconds: list[float], *, fps: int = 4, size: int = 32) -> Path:
    """An MP4 of hard cuts: shot i is ``seconds[i]`` long, a still image (a colour, a square)."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for shot, length in enumerate(seconds):
            colour = np.array(COLOURS[shot % len(COLOURS)], dtype=np.uint8)
            image = np.empty((size, size, 3), dtype=np.uint8)
            image[:] = colour
            x = (shot * 6) % (size - 8)
            image[12:20, x : x + 8] = 255 - colour
            for _ in range(round(length * fps)):
                frame = av.VideoFrame.from_ndarray(image, format="rgb24")
                for packet in stream.encode(frame):
                    container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.fixture(scope="module")
def model():
    import torch

    from tb_reranker.model import TokenBinder, TokenBinderConfig

    torch.manual_seed(0)
    return TokenBinder(TokenBinderConfig.tiny()).eval()


@pytest.fixture
def setup(milvus_uri: str, unique_collection: str, tmp_path: Path):
    index = VideoIndex(milvus_uri, collection=unique_collection)
    store = LmdbFrameStore(tmp_path / "frames")
    yield index, store
    store.close()


def keys(index: VideoIndex, store: LmdbFrameStore) -> tuple[list[str], list[str]]:
    return index.list_ids(), sorted(store.list_ids())


def test_long_video_one_row_per_segment(setup, model, tmp_path: Path) -> None:
    index, store = setup
    long = write_shots(tmp_path / "v" / "long.mp4", [10, 10, 10, 10])  # 40 s, cuts at 10/20/30
    short = write_shots(tmp_path / "v" / "short.mp4", [8, 8])  # 16 s with a cut: stays whole
    report = ingest([long, short], model=model, index=index, store=store, progress=False)
    assert report.ingested == 2 and not report.failed, report.failed
    assert keys(index, store) == (["long", "long~1", "long~2", "long~3", "short"],) * 2
    rows = video_rows(index, ["long", "short"], ("content_hash", "duration_s", "num_frames"))
    spans = [(r["segment"], r["start_s"], r["end_s"]) for r in rows["long"]]
    assert [s[0] for s in spans] == [0, 1, 2, 3]
    for (_, start, end), (want_start, want_end) in zip(
        spans, [(0, 10), (10, 20), (20, 30), (30, 40)], strict=True
    ):
        assert abs(start - want_start) <= 0.5 and abs(end - want_end) <= 0.5
    assert {r["video_id"] for r in rows["long"]} == {"long"}
    assert all(abs(r["duration_s"] - 40.0) < 0.5 for r in rows["long"])
    assert len({r["content_hash"] for r in rows["long"]}) == 1
    # the short clip: one row keyed by its id, the whole video, as before segments
    (whole,) = rows["short"]
    assert (whole["id"], whole["segment"], whole["start_s"]) == ("short", 0, 0.0)
    assert abs(whole["end_s"] - whole["duration_s"]) < 1e-3
    records = store.get_many(["long", "long~2", "short"])
    assert (records["long~2"].segment, records["long~2"].segments) == (2, 4)
    assert records["long"].segments == 4 and records["short"].segments == 1
    assert records["short"].end_s is None
    stamps = records["long~2"].timestamps  # absolute seconds in the file, inside the segment
    assert stamps.min() >= 19.5 and stamps.max() <= 30.5
    # unchanged: nothing to do; the search sees segment vectors
    again = ingest([long, short], model=model, index=index, store=store, progress=False)
    assert again.unchanged == 2 and again.ingested == 0
    assert check(index, store).ok
    hits = index.search(records["long~2"].video_cls(), limit=5, consistency_level="Strong")[0]
    assert hits[0]["id"] == "long~2" and hits[0]["video_id"] == "long"


def test_fixed_windows_and_changed_file_with_fewer_segments(setup, model, tmp_path: Path) -> None:
    index, store = setup
    path = write_shots(tmp_path / "v" / "film.mp4", [20, 20])  # 40 s
    first = ingest(
        [path], model=model, index=index, store=store, progress=False, segment="fixed:10,2"
    )
    assert first.segments == 5  # [0,10] [8,18] [16,26] [24,34] [30,40]
    rows = video_rows(index, ["film"])["film"]
    assert [(r["start_s"], r["end_s"]) for r in rows] == [
        (0.0, 10.0),
        (8.0, 18.0),
        (16.0, 26.0),
        (24.0, 34.0),
        (30.0, 40.0),
    ]
    write_shots(path, [14, 14])  # 28 s: 4 windows
    second = ingest(
        [path], model=model, index=index, store=store, progress=False, segment="fixed:10,2"
    )
    assert second.ingested == 1 and second.segments == 4
    assert keys(index, store) == (["film", "film~1", "film~2", "film~3"],) * 2
    rows = video_rows(index, ["film"])["film"]
    assert len({r["content_hash"] for r in rows}) == 1
    assert store.get_many(["film"])["film"].segments == 4
    # an unchanged file is not cut again under another spec (delete it first to re-cut it)
    third = ingest([path], model=model, index=index, store=store, progress=False, segment="none")
    assert third.unchanged == 1 and third.ingested == 0
    assert len(index.list_ids()) == 4


def test_delete_removes_every_segment(setup, model, tmp_path: Path) -> None:
    index, store = setup
    path = write_shots(tmp_path / "v" / "doc.mp4", [10, 10, 10, 10])
    other = write_shots(tmp_path / "v" / "other.mp4", [3])
    ingest([path, other], model=model, index=index, store=store, progress=False)
    assert len(index.list_ids()) == 5
    report = delete(["doc"], index=index, store=store)
    assert report.deleted == ["doc"] and not report.not_found
    assert keys(index, store) == (["other"], ["other"])
    assert delete(["doc"], index=index, store=store).not_found == ["doc"]


class Crash(RuntimeError):
    pass


@pytest.mark.parametrize("step", ["put_many", "delete_many", "upsert"])
def test_crash_in_the_middle_of_a_video_converges(
    milvus_uri: str, unique_collection: str, tmp_path: Path, model, step: str
) -> None:
    """A changed file with fewer segments, killed at each write: no video's rows ever mix two
    versions of its file, and the next ingest converges to the new file alone."""

    class CrashingStore(LmdbFrameStore):
        armed = False

        def put_many(self, records) -> None:
            super().put_many(records)
            if self.armed and step == "put_many":
                raise Crash(step)

        def delete_many(self, ids) -> None:
            super().delete_many(ids)
            if self.armed and step == "delete_many":
                raise Crash(step)

    class CrashingIndex(VideoIndex):
        armed = False

        def upsert(self, rows) -> int:
            if self.armed and step == "upsert":
                raise Crash(step)
            return super().upsert(rows)

    index = CrashingIndex(milvus_uri, collection=unique_collection)
    store = CrashingStore(tmp_path / "frames")
    path = write_shots(tmp_path / "v" / "show.mp4", [10, 10, 10, 10])
    options = {"model": model, "index": index, "store": store, "progress": False}
    ingest([path], segment="fixed:10", **options)
    old = video_rows(index, ["show"])["show"]
    assert len(old) == 4
    write_shots(path, [12, 12])  # 24 s: three windows of 10 s
    store.armed = index.armed = True
    with pytest.raises(Crash):
        ingest([path], segment="fixed:10", **options)
    rows = video_rows(index, ["show"])["show"]
    assert len({r["content_hash"] for r in rows}) == 1  # one version, never a mix
    store.armed = index.armed = False
    resumed = ingest([path], segment="fixed:10", **options)
    assert resumed.ingested == 1
    assert keys(index, store) == (["show", "show~1", "show~2"],) * 2
    rows = video_rows(index, ["show"])["show"]
    assert (
        len({r["content_hash"] for r in rows}) == 1
        and rows[0]["content_hash"] != old[0]["content_hash"]
    )
    assert check(index, store).ok
    store.close()


def test_repair_rebuilds_segment_rows(setup, model, tmp_path: Path) -> None:
    index, store = setup
    path = write_shots(tmp_path / "v" / "clipx.mp4", [10, 10, 10, 10])
    ingest([path], model=model, index=index, store=store, progress=False, segment="fixed:10")
    before = {r["id"]: r for r in video_rows(index, ["clipx"])["clipx"]}
    index.delete(["clipx~2"])  # a row lost: its record is still stored
    found = check(index, store)
    assert found.only_in_store == ["clipx~2"] and not found.ok
    check(index, store, repair=True, model=model)
    after = {r["id"]: r for r in video_rows(index, ["clipx"])["clipx"]}
    assert sorted(after) == sorted(before)
    rebuilt = after["clipx~2"]
    assert (rebuilt["video_id"], rebuilt["segment"]) == ("clipx", 2)
    assert (rebuilt["start_s"], rebuilt["end_s"]) == (
        before["clipx~2"]["start_s"],
        before["clipx~2"]["end_s"],
    )
    assert check(index, store).ok


def test_schema_one_collection_still_ingests_and_reads(
    milvus_uri: str, unique_collection: str, tmp_path: Path, model
) -> None:
    """A collection made before segments (schema 1, the segment fields not in the schema) takes
    segment rows as dynamic fields, and its old rows read as segment 0 of their video."""
    index = VideoIndex(milvus_uri, collection=unique_collection, dim=model.embed_dim)
    milvus_schema.create_collection(index.client, unique_collection, model.embed_dim, version=1)
    assert milvus_schema.check_collection(index.client, unique_collection) == []
    index.upsert(  # a row as the code before segments wrote it
        [
            {
                "id": "old",
                "cls": np.ones(model.embed_dim, dtype=np.float32),
                "uri": "/x/old.mp4",
                "duration_s": 4.0,
                "num_frames": 4,
                "content_hash": "h",
            }
        ]
    )
    # prepare_rows adds the segment fields; strip them to write the old row as it was
    index.client.upsert(
        unique_collection,
        [
            {
                "id": "older",
                "cls": [1.0] * model.embed_dim,
                "uri": "",
                "duration_s": 3.0,
                "num_frames": 2,
                "content_hash": "g",
            }
        ],
    )
    store = LmdbFrameStore(tmp_path / "frames")
    path = write_shots(tmp_path / "v" / "newer.mp4", [10, 10, 10, 10])
    report = ingest(
        [path], model=model, index=index, store=store, progress=False, segment="fixed:10"
    )
    assert report.segments == 4 and not report.failed
    rows = video_rows(index, ["newer", "older"], ("duration_s",))
    assert [(r["id"], r["segment"]) for r in rows["newer"]] == [
        ("newer", 0),
        ("newer~1", 1),
        ("newer~2", 2),
        ("newer~3", 3),
    ]
    (older,) = rows["older"]
    assert (older["video_id"], older["segment"], older["start_s"], older["end_s"]) == (
        "older",
        0,
        0.0,
        3.0,
    )
    hits = index.search(
        store.get_many(["newer~3"])["newer~3"].video_cls(), limit=3, consistency_level="Strong"
    )[0]
    assert hits[0]["id"] == "newer~3" and hits[0]["segment"] == 3 and hits[0]["video_id"] == "newer"
    assert delete(["newer"], index=index, store=store).deleted == ["newer"]
    assert sorted(index.list_ids()) == ["old", "older"]
    store.close()


def test_cli_segments_on_a_fresh_data_dir(tmp_path: Path) -> None:
    """`tb ingest --segment fixed:10,2` and the default, `tb check`, `tb delete`, as a user runs
    them: subprocesses on a fresh --data-dir with the embedded defaults."""
    import json
    import os
    import subprocess
    import sys

    import torch

    from tb_reranker.model import TokenBinder, TokenBinderConfig, save_checkpoint

    data = tmp_path / "tb_data"
    torch.manual_seed(0)
    save_checkpoint(TokenBinder(TokenBinderConfig.tiny()), data / "checkpoint")
    write_shots(tmp_path / "fixed" / "lecture.mp4", [20, 20])  # 40 s: 5 windows of 10 s
    write_shots(tmp_path / "fixed" / "teaser.mp4", [2, 2])  # 4 s: whole
    write_shots(tmp_path / "shots" / "match.mp4", [10, 10, 10, 10])  # 4 shots
    env = {k: v for k, v in os.environ.items() if not k.startswith("TB_")}

    def tb(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "tb_reranker", *args, "--data-dir", str(data)]
        return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)

    done = tb(
        "ingest", str(tmp_path / "fixed"), "--segment", "fixed:10,2", "--json", "--no-progress"
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert (report["ingested"], report["segments"]) == (2, 6)
    done = tb("ingest", str(tmp_path / "shots"), "--no-progress")
    assert done.returncode == 0, done.stderr
    assert "ingested 1 (re-indexed 0) as 4 segments" in done.stdout
    done = tb("check", "--json")
    assert done.returncode == 0 and json.loads(done.stdout)["ok"] is True, done.stdout
    done = tb("delete", "lecture", "--json")
    assert done.returncode == 0 and json.loads(done.stdout)["ids"] == ["lecture"], done.stderr
    done = tb("check", "--json")
    assert done.returncode == 0 and json.loads(done.stdout)["ok"] is True, done.stdout
    for bad in ("fixed:10,10", "scenes"):
        done = tb("ingest", str(tmp_path / "fixed"), "--segment", bad)
        assert done.returncode == 2, (bad, done.stderr)
        assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr

    from tb_reranker.client import Client

    with Client(data_dir=str(data)) as client:
        assert client.index.list_ids() == ["match", "match~1", "match~2", "match~3", "teaser"]
        assert sorted(client.store.list_ids()) == client.index.list_ids()


def test_repair_deletes_orphan_segment_records(setup, model, tmp_path: Path) -> None:
    """A segment record that no current video has (a crash left it: the video's first record
    names fewer segments) is deleted by repair, never re-indexed into a visible row."""
    from dataclasses import replace

    index, store = setup
    path = write_shots(tmp_path / "v" / "reel.mp4", [10, 10, 10, 10])
    ingest([path], model=model, index=index, store=store, progress=False, segment="fixed:10")
    last = store.get_many(["reel~3"])["reel~3"]
    store.put_many({"reel~6": replace(last, segment=6, segments=7)})  # an older, longer cut
    found = check(index, store)
    assert found.orphans == ["reel~6"] and found.only_in_store == [] and not found.ok
    repaired = check(index, store, repair=True, model=model)
    assert repaired.repaired and "reel~6" not in store.list_ids()
    assert keys(index, store) == (["reel", "reel~1", "reel~2", "reel~3"],) * 2
    assert check(index, store).ok
