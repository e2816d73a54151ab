"""Ingestion of real MP4s (PyAV) with the tiny model into a real store and real Milvus.

Covers: ingest, idempotent re-ingest, changed file replaced, crash between the store and the
Milvus write then resume, delete from both, check/repair of every kind of disagreement, a corrupt
video in a batch, unsafe ids, a fingerprint mismatch, input expansion (dirs, globs, @lists).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tb_reranker.errors import InvalidInputError, ModelMismatchError, NotFoundError
from tb_reranker.index import VideoIndex, check, delete, ingest
from tb_reranker.index.inputs import expand_paths
from tb_reranker.stores import FrameRecord, LmdbFrameStore


@pytest.fixture(scope="module")
def model():
    import torch

    from tb_reranker.model import TokenBinder, TokenBinderConfig

    torch.manual_seed(0)
    return TokenBinder(TokenBinderConfig.tiny()).eval()


@pytest.fixture(scope="module")
def videos_dir(tmp_path_factory: pytest.TempPathFactory, mp4_writer) -> Path:
    write_mp4 = mp4_writer
    root = tmp_path_factory.mktemp("videos")
    for i, colour in enumerate(mp4_writer.colours[:4]):
        write_mp4(root / ("sub" if i >= 2 else "") / f"clip{i}.mp4", colour, frames=6 + 2 * i)
    return root


@pytest.fixture
def setup(milvus_uri: str, unique_collection: str, tmp_path: Path, model):
    index = VideoIndex(milvus_uri, collection=unique_collection)
    store = LmdbFrameStore(tmp_path / "frames")
    yield index, store
    store.close()


def all_ids(index: VideoIndex, store: LmdbFrameStore) -> tuple[list[str], list[str]]:
    return index.list_ids(), sorted(store.list_ids())


def test_ingest_idempotent_and_searchable(setup, model, videos_dir: Path) -> None:
    index, store = setup
    report = ingest(
        [videos_dir],
        model=model,
        index=index,
        store=store,
        batch_size=3,
        progress=False,
        metadata={"clip1": {"genre": "red-ish", "year": 2024}},
    )
    assert report.ingested == 4 and report.unchanged == 0 and report.failed == []
    assert report.videos_per_s > 0
    assert all_ids(index, store) == (["clip0", "clip1", "clip2", "clip3"],) * 2
    assert index.stored_fingerprint() == model.vision_fingerprint()

    record = store.get_many(["clip3"])["clip3"]
    assert record.tokens.dtype == np.float16 and record.tokens.shape == (
        model.num_frames,
        model.embed_dim,
    )
    assert record.content_hash and record.uri.endswith("clip3.mp4")
    row = index.get(["clip3"], with_vectors=True)["clip3"]
    assert (
        row["content_hash"] == record.content_hash and row["num_frames"] == record.num_real_frames
    )
    # the stored CLS is the model's: L2-normalised mean of the real frames' tokens
    np.testing.assert_allclose(row["cls"], record.video_cls(), atol=5e-3)
    assert np.linalg.norm(row["cls"]) == pytest.approx(1.0, abs=1e-4)

    hits = index.search(row["cls"], 2, consistency_level="Strong")[0]
    assert hits[0]["id"] == "clip3" and hits[0]["score"] == pytest.approx(1.0, abs=1e-3)
    assert (
        index.search(row["cls"], 4, filter='genre == "red-ish"', consistency_level="Strong")[0][0][
            "year"
        ]
        == 2024
    )

    again = ingest([videos_dir], model=model, index=index, store=store, progress=False)
    assert again.ingested == 0 and again.unchanged == 4 and again.failed == []
    assert index.count() == 4 and len(store) == 4


def test_video_cls_matches_model_pool(model, videos_dir: Path) -> None:
    import torch

    from tb_reranker.video import decode_video

    clip = decode_video(
        videos_dir / "clip0.mp4",
        num_frames=model.num_frames,
        image_size=model.image_size,
        mean=model.image_mean,
        std=model.image_std,
    )
    with torch.inference_mode():
        cls, tokens = model.encode_frames(
            torch.from_numpy(clip.frames)[None], torch.from_numpy(clip.mask)[None]
        )
    record = FrameRecord(
        tokens=tokens[0].numpy(),
        timestamps=clip.timestamps.astype(np.float32),
        content_hash="h",
        mask=clip.mask,
    )
    np.testing.assert_allclose(record.video_cls(), cls[0].numpy(), atol=1e-5)


def test_changed_file_replaced(setup, model, tmp_path: Path, mp4_writer) -> None:
    index, store = setup
    write_mp4 = mp4_writer
    path = write_mp4(tmp_path / "v" / "movie.mp4", mp4_writer.colours[0])
    assert ingest([path], model=model, index=index, store=store, progress=False).ingested == 1
    before = store.get_many(["movie"])["movie"]
    write_mp4(path, mp4_writer.colours[2], frames=14)  # same name, new content
    report = ingest([path], model=model, index=index, store=store, progress=False)
    assert report.ingested == 1 and report.unchanged == 0
    after = store.get_many(["movie"])["movie"]
    assert after.content_hash != before.content_hash
    assert index.get(["movie"])["movie"]["content_hash"] == after.content_hash
    assert index.count() == 1 and len(store) == 1


def test_crash_between_store_and_milvus_then_resume(
    milvus_uri: str, unique_collection: str, tmp_path: Path, model, videos_dir: Path
) -> None:
    class Crash(RuntimeError):
        pass

    class CrashingStore(LmdbFrameStore):
        """Dies right after its second batch is written: the tokens are stored, the Milvus
        write of that batch has not started (``ingest`` writes the store first)."""

        def __init__(self, path: Path) -> None:
            super().__init__(path)
            self.batches: list[list[str]] = []

        def put_many(self, records) -> None:
            super().put_many(records)
            self.batches.append(list(records))
            if len(self.batches) == 2:
                raise Crash("killed")

    index = VideoIndex(milvus_uri, collection=unique_collection)
    store = CrashingStore(tmp_path / "frames")
    with pytest.raises(Crash):
        ingest(
            [videos_dir],
            model=model,
            index=index,
            store=store,
            batch_size=2,
            progress=False,
        )
    assert store.batches == [["clip0", "clip1"], ["clip2", "clip3"]]
    # the first batch is in both, the second only in the store
    assert index.list_ids() == ["clip0", "clip1"]
    assert sorted(store.list_ids()) == ["clip0", "clip1", "clip2", "clip3"]
    found = check(index, store)
    assert found.only_in_store == ["clip2", "clip3"] and not found.ok

    resumed = ingest([videos_dir], model=model, index=index, store=store, progress=False)
    assert resumed.unchanged == 2 and resumed.ingested == 2 and resumed.reindexed == 2
    assert all_ids(index, store) == (["clip0", "clip1", "clip2", "clip3"],) * 2
    assert check(index, store).ok
    assert index.count() == 4  # nothing duplicated
    store.close()


def test_corrupt_video_in_batch(setup, model, videos_dir: Path, tmp_path: Path) -> None:
    index, store = setup
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 50)
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    report = ingest(
        [videos_dir / "clip0.mp4", bad, empty, videos_dir / "clip1.mp4", tmp_path / "nope.mp4"],
        model=model,
        index=index,
        store=store,
        batch_size=8,
        progress=False,
    )
    assert report.ingested == 2
    failed = dict(report.failed)
    assert set(failed) == {str(bad), str(empty), str(tmp_path / "nope.mp4")}
    assert all(reason for reason in failed.values())
    assert all_ids(index, store) == (["clip0", "clip1"],) * 2


def test_unsafe_and_duplicate_ids_rejected(
    setup, model, videos_dir: Path, tmp_path: Path, mp4_writer
) -> None:
    index, store = setup
    clip = str(videos_dir / "clip0.mp4")
    for bad in ["../x", "/abs", "a/b", ""]:
        with pytest.raises(InvalidInputError):
            ingest([clip], model=model, index=index, store=store, ids={clip: bad}, progress=False)
    write_mp4 = mp4_writer
    twin = write_mp4(tmp_path / "other" / "clip0.mp4", mp4_writer.colours[5])
    with pytest.raises(InvalidInputError, match="clip0"):
        ingest([clip, twin], model=model, index=index, store=store, progress=False)
    odd = write_mp4(tmp_path / "my video.mp4", mp4_writer.colours[4])
    with pytest.raises(InvalidInputError, match="my video"):
        ingest([odd], model=model, index=index, store=store, progress=False)
    report = ingest(
        [odd], model=model, index=index, store=store, ids={str(odd): "my_video"}, progress=False
    )
    assert report.ids == ["my_video"]
    assert sorted(store.list_ids()) == ["my_video"]


def test_delete_from_both(setup, model, videos_dir: Path) -> None:
    index, store = setup
    ingest([videos_dir], model=model, index=index, store=store, progress=False)
    report = delete(["clip1", "clip3", "never"], index=index, store=store)
    assert report.deleted == ["clip1", "clip3"] and report.not_found == ["never"]
    assert all_ids(index, store) == (["clip0", "clip2"],) * 2
    with pytest.raises(InvalidInputError):
        delete(["../clip0"], index=index, store=store)


def test_check_and_repair(setup, model, videos_dir: Path) -> None:
    index, store = setup
    ingest([videos_dir], model=model, index=index, store=store, progress=False)
    assert check(index, store).ok
    # store-only (row lost, and a stray entry); index-only; newer tokens (hash differs); corrupt
    index.delete(["clip1"])
    good = store.get_many(["clip0"])["clip0"]
    store.put_many({"orphan": good})
    store.delete_many(["clip2"])
    from dataclasses import replace

    store.put_many({"clip3": replace(store.get_many(["clip3"])["clip3"], content_hash="newer")})
    with store._env.begin(write=True) as txn:
        txn.put(b"clip0", b"corrupt!")
    report = check(index, store, model=model)
    assert report.only_in_index == ["clip2"]
    assert report.only_in_store == ["clip1", "orphan"]
    assert report.hash_mismatch == ["clip3"]
    assert report.corrupt == ["clip0"]
    assert report.fingerprint_ok and not report.ok

    fixed = check(index, store, repair=True, model=model)
    assert fixed.repaired and fixed.actions
    assert check(index, store).ok
    assert all_ids(index, store) == (["clip1", "clip3", "orphan"],) * 2
    row = index.get(["orphan"], with_vectors=True)["orphan"]
    np.testing.assert_allclose(row["cls"], good.video_cls(), atol=1e-5)
    assert index.get(["clip3"])["clip3"]["content_hash"] == "newer"

    store.put_many({"stray": good})
    check(index, store, repair=True, store_only="delete")
    assert all_ids(index, store) == (["clip1", "clip3", "orphan"],) * 2


def test_fingerprint_mismatch_refused(
    setup, model, videos_dir: Path, milvus_uri: str, unique_collection: str
) -> None:
    _, store = setup
    index = VideoIndex(
        milvus_uri, collection=unique_collection, dim=model.embed_dim, fingerprint="other-model"
    )
    index.create()
    fresh = VideoIndex(index.uri, collection=index.collection)
    with pytest.raises(ModelMismatchError):
        ingest([videos_dir / "clip0.mp4"], model=model, index=fresh, store=store, progress=False)
    assert len(store) == 0
    report = check(VideoIndex(index.uri, collection=index.collection), store, model=model)
    assert not report.fingerprint_ok
    with pytest.raises(ModelMismatchError):
        check(VideoIndex(index.uri, collection=index.collection), store, repair=True, model=model)


def test_check_unknown_collection(milvus_lite_uri: str, tmp_path: Path) -> None:
    with LmdbFrameStore(tmp_path / "s") as store, pytest.raises(NotFoundError):
        check(VideoIndex(milvus_lite_uri, collection="absent_coll"), store)


def test_expand_paths(videos_dir: Path, tmp_path: Path) -> None:
    listing = tmp_path / "list.txt"
    listing.write_text(
        f"# two clips\n{videos_dir / 'clip0.mp4'}\n\n{videos_dir / 'sub' / 'clip2.mp4'}\nmissing.mp4\n"
    )
    paths, problems = expand_paths(
        [f"@{listing}", str(videos_dir / "sub" / "*.mp4"), str(videos_dir)]
    )
    assert [Path(p).name for p in paths] == ["clip0.mp4", "clip2.mp4", "clip3.mp4", "clip1.mp4"]
    assert problems == [(str(tmp_path / "missing.mp4"), "no such file")]
    _, problems = expand_paths([str(tmp_path / "*.mkv"), "@/no/such/list.txt"])
    assert [p for p, _ in problems] == [str(tmp_path / "*.mkv"), "@/no/such/list.txt"]


def test_check_does_not_unlock_writes(setup, model) -> None:
    index, store = setup
    VideoIndex(
        index.uri, collection=index.collection, dim=model.embed_dim, fingerprint="other"
    ).create()
    bound = VideoIndex(
        index.uri, collection=index.collection, fingerprint=model.vision_fingerprint()
    )
    assert not check(bound, store).fingerprint_ok
    with pytest.raises(ModelMismatchError):
        bound.upsert([{"id": "x", "cls": np.ones(model.embed_dim)}])
