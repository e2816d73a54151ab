"""``tb ingest s3://bucket/prefix`` (issue 23): videos read from a real S3 endpoint (moto's
threaded server on loopback, the ``s3_endpoint`` fixture) are listed, hashed and decoded exactly as
the same files on disk: the CLI in a subprocess on a fresh ``--data-dir`` writes the same ids,
vectors and tokens as an ingest of the local copies, a second run finds everything unchanged, a
corrupt object fails alone under its own url, the temporary downloads are gone afterwards, and an
endpoint that does not answer is one line and exit 2."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

TOLERANCE = 1e-4
BUCKET = "tb-inputs"


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory, mp4_writer) -> Path:
    """``root/checkpoint`` (a tiny model) and ``root/videos``: three clips (one in a sub-folder),
    a corrupt ``.mp4`` and a text file."""
    import torch

    from tb_reranker.model import TokenBinder, TokenBinderConfig, save_checkpoint

    root = tmp_path_factory.mktemp("s3_library")
    torch.manual_seed(0)
    save_checkpoint(TokenBinder(TokenBinderConfig.tiny()), root / "checkpoint")
    videos = root / "videos"
    for i, name in enumerate(("s3a.mp4", "s3b.mp4", "sub/s3c.mp4")):
        mp4_writer(videos / name, mp4_writer.colours[i])
    (videos / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 not really a video")
    (videos / "notes.txt").write_text("not a video")
    return root


@pytest.fixture
def bucket(s3_env: str, library: Path) -> str:
    """The library's files under ``s3://tb-inputs/lib/videos/``, and one more clip under the
    sibling prefix ``lib/videos2/`` (a prefix is a folder: it must not be picked up)."""
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_env)
    existing = [b["Name"] for b in s3.list_buckets().get("Buckets", [])]
    if BUCKET not in existing:
        s3.create_bucket(Bucket=BUCKET)
        for path in sorted((library / "videos").rglob("*")):
            if path.is_file():
                key = f"lib/videos/{path.relative_to(library / 'videos').as_posix()}"
                s3.upload_file(str(path), BUCKET, key)
        s3.upload_file(str(library / "videos" / "s3a.mp4"), BUCKET, "lib/videos2/other.mp4")
    return BUCKET


def url(key: str) -> str:
    return f"s3://{BUCKET}/{key}"


def test_expand_lists_video_objects_under_a_prefix(bucket: str, tmp_path: Path) -> None:
    from tb_reranker.index.inputs import expand_paths

    listed = tmp_path / "inputs.txt"
    listed.write_text(f"# from a list file\n{url('lib/videos/s3b.mp4')}\n")
    paths, problems = expand_paths(
        [
            url("lib/videos"),  # no trailing slash: still the folder, not lib/videos2/
            url("lib/videos/s3a.mp4"),  # named again: once
            f"@{listed}",
            url("empty/"),
            "s3://no-such-bucket-here/videos/",
        ]
    )
    assert paths == [
        url("lib/videos/broken.mp4"),
        url("lib/videos/s3a.mp4"),
        url("lib/videos/s3b.mp4"),
        url("lib/videos/sub/s3c.mp4"),
    ]
    assert [item for item, _ in problems] == [url("empty/"), "s3://no-such-bucket-here/videos/"]
    assert "no video object" in problems[0][1]
    assert "NoSuchBucket" in problems[1][1]


def test_an_object_hashes_as_the_same_bytes_on_disk(bucket: str, library: Path) -> None:
    from tb_reranker.errors import VideoDecodeError
    from tb_reranker.video import content_hash

    assert content_hash(url("lib/videos/sub/s3c.mp4")) == content_hash(
        str(library / "videos" / "sub" / "s3c.mp4")
    )
    with pytest.raises(VideoDecodeError, match="NoSuchKey"):
        content_hash(url("lib/videos/gone.mp4"))


def tb(*args: str, env: dict[str, str]) -> tuple[int, Any, str]:
    done = subprocess.run(
        [sys.executable, "-m", "tb_reranker", *args, "--json", "--no-progress"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    return done.returncode, (json.loads(done.stdout) if done.stdout.strip() else {}), done.stderr


def contents(data: Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Every Milvus row's vector and every stored record's tokens, by key."""
    from tb_reranker.index import VideoIndex
    from tb_reranker.stores import LmdbFrameStore

    index = VideoIndex(str(data / "milvus.db"), collection="tb_videos")
    try:
        rows = index.get([str(r["id"]) for r in index.iter_rows(("id",))], with_vectors=True)
    finally:
        index.close()
    with LmdbFrameStore(data / "frames") as store:
        records = store.get_many(sorted(store.list_ids()))
    vectors = {k: np.asarray(r["cls"], dtype=np.float32) for k, r in rows.items()}
    return vectors, {k: r.tokens.astype(np.float32) for k, r in records.items()}


def uris(data: Path) -> dict[str, str]:
    """Each video's ``uri`` as its Milvus rows record it."""
    from tb_reranker.index import VideoIndex

    index = VideoIndex(str(data / "milvus.db"), collection="tb_videos")
    try:
        return {str(r["video_id"]): str(r["uri"]) for r in index.iter_rows(("video_id", "uri"))}
    finally:
        index.close()


def test_cli_ingests_a_prefix_exactly_like_the_files_on_disk(
    bucket: str, library: Path, tmp_path: Path
) -> None:
    downloads = tmp_path / "tmp"
    downloads.mkdir()
    env = {"TMPDIR": str(downloads)}
    checkpoint = ["--checkpoint", str(library / "checkpoint")]
    code, local, err = tb(
        "ingest",
        str(library / "videos"),
        "--data-dir",
        str(tmp_path / "disk"),
        *checkpoint,
        env=env,
    )
    assert code == 1 and local["ingested"] == 3, err
    code, report, err = tb(
        "ingest", url("lib/videos/"), "--data-dir", str(tmp_path / "s3"), *checkpoint, env=env
    )
    assert code == 1, err  # the corrupt object, and it alone, under its own url
    assert [f["path"] for f in report["failed"]] == [url("lib/videos/broken.mp4")]
    assert report["failed"][0]["reason"] == local["failed"][0]["reason"]
    assert sorted(report["ids"]) == sorted(local["ids"]) == ["s3a", "s3b", "s3c"]
    assert "Traceback" not in err
    assert not list(downloads.glob("tb-s3-*")), "a temporary download was left behind"

    code, again, err = tb(
        "ingest", url("lib/videos"), "--data-dir", str(tmp_path / "s3"), *checkpoint, env=env
    )
    assert code == 1 and again["unchanged"] == 3 and again["ingested"] == 0, err
    assert uris(tmp_path / "s3") == {  # where each video lives: its url, not a local path
        "s3a": url("lib/videos/s3a.mp4"),
        "s3b": url("lib/videos/s3b.mp4"),
        "s3c": url("lib/videos/sub/s3c.mp4"),
    }
    assert uris(tmp_path / "disk")["s3c"] == str((library / "videos" / "sub" / "s3c.mp4").resolve())
    # the same bytes: the disk ingest of the same files finds them unchanged in either store
    for ours, theirs in zip(contents(tmp_path / "s3"), contents(tmp_path / "disk"), strict=True):
        assert sorted(ours) == sorted(theirs)
        for key, value in ours.items():
            np.testing.assert_allclose(theirs[key], value, atol=TOLERANCE, err_msg=key)


def test_an_endpoint_that_does_not_answer_is_one_line(
    s3_env: str, library: Path, tmp_path: Path
) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = sock.getsockname()[1]
    code, _, err = tb(
        "ingest",
        url("lib/videos/"),
        "--data-dir",
        str(tmp_path / "data"),
        "--checkpoint",
        str(library / "checkpoint"),
        env={"TB_S3_ENDPOINT": f"http://127.0.0.1:{dead}"},
    )
    assert code == 2
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert errors[0].startswith("tb ingest: error: nothing to ingest: " + url("lib/videos/"))
    assert "cannot list the bucket" in errors[0]
