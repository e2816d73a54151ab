"""``tb ingest --engine ray`` (issue 23) end to end: the CLI in a subprocess on real synthetic
videos (short clips, a long multi-segment file, a corrupt file) against ``--engine local`` over
the same files (same ids, vectors, tokens and search scores), a second run that finds everything
unchanged, the missing extra and a dead address (one line, exit 2), and a Ray worker killed with
SIGKILL in the middle of a run (the run still converges: every id once, the same vectors).

One local Ray runtime per module (``address="local"``, its own temporary directory: never
another test process's cluster); the CLI joins it with ``--ray-address``. The fault test starts
the CLI's own private runtime instead, so the workers it kills are the run's own.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytestmark = pytest.mark.slow

TOLERANCE = 1e-4
RUN_TIMEOUT_S = 300


def tb(*args: str, env: dict[str, str] | None = None, output: Path | None = None) -> Any:
    """``tb ARGS`` in a subprocess: ``(exit code, stdout, stderr)``; with ``output``, the
    running Popen, its stdout and stderr going to ``output.out`` / ``output.err``."""
    command = [sys.executable, "-m", "tb_reranker", *args]
    full_env = {**os.environ, "TB_PROGRESS_INTERVAL_S": "1", **(env or {})}
    if output is not None:
        with open(f"{output}.out", "w") as out, open(f"{output}.err", "w") as err:
            return subprocess.Popen(command, env=full_env, stdout=out, stderr=err, text=True)
    done = subprocess.run(
        command, env=full_env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S
    )
    return done.returncode, done.stdout, done.stderr


@pytest.fixture(scope="module")
def ray_address() -> Iterator[str]:
    ray = pytest.importorskip("ray")
    temp = tempfile.mkdtemp(prefix="tbr-")  # short: Ray's socket paths must fit 107 bytes
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        logging_level=logging.ERROR,
        log_to_driver=False,
        _temp_dir=temp,
    )
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``root/checkpoint`` (a tiny model), ``root/videos``: 6 short clips, one 40 s file of 4
    segments and a corrupt file; ``root/many``: 40 short clips and the long file."""
    import torch

    from tb_reranker.model import TokenBinder, TokenBinderConfig, save_checkpoint

    root = tmp_path_factory.mktemp("ray_library")
    torch.manual_seed(0)
    save_checkpoint(TokenBinder(TokenBinderConfig.tiny()), root / "checkpoint")
    for args in (("short", "--train", "40", "--test", "0"), ("long", "--long", "--pairs", "1")):
        code, _, err = tb("synth", str(root / args[0]), *args[1:], "--no-progress")
        assert code == 0, err
    videos, many = root / "videos", root / "many"
    videos.mkdir()
    many.mkdir()
    clips = sorted((root / "short" / "videos").glob("*.mp4"))
    long = root / "long" / "videos" / "long_000000.mp4"
    for clip in clips[:6]:
        shutil.copy(clip, videos / clip.name)
    for clip in [*clips, long]:
        shutil.copy(clip, many / clip.name)
    shutil.copy(long, videos / long.name)
    (videos / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 not really a video")
    return root


def ingest(library: Path, source: str, data: Path, *extra: str) -> tuple[int, dict, str]:
    args = ["ingest", str(library / source), "--data-dir", str(data)]
    args += ["--checkpoint", str(library / "checkpoint"), "--json", "--no-progress", *extra]
    code, out, err = tb(*args)
    return code, (json.loads(out) if out.strip() else {}), err


def contents(data: Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Every Milvus row's vector and every stored record's tokens, by key."""
    from tb_reranker.index import VideoIndex
    from tb_reranker.stores import LmdbFrameStore

    index = VideoIndex(str(data / "milvus.db"), collection="tb_videos")
    try:
        keys = [str(row["id"]) for row in index.iter_rows(("id",))]
        assert len(keys) == len(set(keys)), "a key twice in Milvus"
        rows = index.get(keys, with_vectors=True)
    finally:
        index.close()
    with LmdbFrameStore(data / "frames") as store:
        stored = sorted(store.list_ids())
        records = store.get_many(stored)
    assert sorted(rows) == stored
    vectors = {k: np.asarray(r["cls"], dtype=np.float32) for k, r in rows.items()}
    return vectors, {k: r.tokens.astype(np.float32) for k, r in records.items()}


def assert_same(a: tuple[dict, dict], b: tuple[dict, dict]) -> None:
    for left, right in zip(a, b, strict=True):
        assert sorted(left) == sorted(right)
        for key, value in left.items():
            np.testing.assert_allclose(right[key], value, atol=TOLERANCE, err_msg=key)


def search(data: Path, library: Path, text: str) -> list[tuple[str, float]]:
    from tb_reranker import Client

    with Client(data_dir=str(data), checkpoint=str(library / "checkpoint")) as client:
        return [(h.id, h.score) for h in client.search(text, limit=5)]


def test_ray_matches_local(library: Path, ray_address: str, tmp_path: Path) -> None:
    local_code, local, err = ingest(library, "videos", tmp_path / "local")
    assert local_code == 1 and local["engine"] == "local", err
    code, report, err = ingest(
        library, "videos", tmp_path / "ray", "--engine", "ray", "--ray-address", ray_address
    )
    assert code == 1, err  # the corrupt file, and it alone
    assert report["engine"] == "ray"
    assert [f["path"] for f in report["failed"]] == [str(library / "videos" / "broken.mp4")]
    assert report["failed"] == local["failed"]
    assert sorted(report["ids"]) == sorted(local["ids"]) and len(report["ids"]) == 7
    assert report["segments"] == local["segments"] == 10  # 6 clips + 4 segments of the long one
    assert "Traceback" not in err
    code, again, err = ingest(
        library, "videos", tmp_path / "ray", "--engine", "ray", "--ray-address", ray_address
    )
    assert code == 1 and again["unchanged"] == 7 and again["ingested"] == 0, err
    assert again["engine"] == "ray"
    # what both wrote, read here once the runs are over (Milvus Lite: one process at a time)
    assert_same(contents(tmp_path / "local"), contents(tmp_path / "ray"))
    for text in ("a red circle then a blue square", "something moving left"):
        ours = search(tmp_path / "ray", library, text)
        theirs = search(tmp_path / "local", library, text)
        assert [i for i, _ in ours] == [i for i, _ in theirs]
        np.testing.assert_allclose([s for _, s in ours], [s for _, s in theirs], atol=TOLERANCE)


def test_ray_reads_an_s3_prefix_like_the_files_on_disk(
    library: Path, s3_env: str, tmp_path: Path
) -> None:
    """``tb ingest s3://bucket/prefix --engine ray`` (its own local runtime, whose workers
    download the objects they decode): the same failures, ids, vectors and tokens as the local
    engine over the same files on disk."""
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_env)
    s3.create_bucket(Bucket="tb-ray-inputs")
    for path in sorted((library / "videos").iterdir()):
        s3.upload_file(str(path), "tb-ray-inputs", f"lib/{path.name}")
    code, local, err = ingest(library, "videos", tmp_path / "local")
    assert code == 1 and local["ingested"] == 7, err
    args = ["ingest", "s3://tb-ray-inputs/lib/", "--data-dir", str(tmp_path / "ray")]
    args += ["--checkpoint", str(library / "checkpoint"), "--json", "--no-progress"]
    code, out, err = tb(*args, "--engine", "ray", "--decode-cpus", "0.5")
    assert code == 1 and "Traceback" not in err, err
    report = json.loads(out)
    assert report["engine"] == "ray" and report["ingested"] == 7
    assert report["failed"] == [{**local["failed"][0], "path": "s3://tb-ray-inputs/lib/broken.mp4"}]
    assert_same(contents(tmp_path / "local"), contents(tmp_path / "ray"))


def test_missing_extra_and_dead_address(library: Path, tmp_path: Path) -> None:
    hide = tmp_path / "hide_ray"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text("import sys\nsys.modules['ray'] = None\n")
    env = {"PYTHONPATH": os.pathsep.join([str(hide), os.environ.get("PYTHONPATH", "")])}
    args = ["ingest", str(library / "videos"), "--data-dir", str(tmp_path / "d")]
    args += ["--checkpoint", str(library / "checkpoint"), "--engine", "ray"]
    code, out, err = tb(*args, env=env)
    assert code == 2 and out == "", err
    assert "pip install 'tb_reranker[ray]'" in err.strip().splitlines()[-1], err
    assert "Traceback" not in err
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    started = time.monotonic()
    code, out, err = tb(*args, "--ray-address", f"127.0.0.1:{port}")
    assert code == 2 and out == "" and time.monotonic() - started < 60, err
    assert "no Ray cluster answers" in err.strip().splitlines()[-1], err
    assert "Traceback" not in err
    code, _, err = tb(*args, "--ray-address", f"ray://127.0.0.1:{port}")
    assert code == 2 and "no Ray cluster answers" in err and "Traceback" not in err, err


def _descendants(pid: int) -> list[int]:
    """Every process under ``pid`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _busy_ray_worker(pid: int) -> tuple[int, str] | None:
    """A ``ray::`` worker under ``pid`` that is decoding or encoding (not ``ray::IDLE``)."""
    for child in _descendants(pid):
        try:
            title = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")[0].decode()
        except OSError:
            continue
        if title.startswith("ray::") and ("Map" in title or "decode" in title):
            return child, title
    return None


def test_killed_worker_still_converges(library: Path, tmp_path: Path) -> None:
    """SIGKILL to a busy Ray worker of a running ``tb ingest --engine ray`` (its own local
    runtime): the run finishes with every video once, as the local engine writes them."""
    code, local, err = ingest(library, "many", tmp_path / "local")
    assert code == 0 and local["ingested"] == 41, err
    args = ["ingest", str(library / "many"), "--data-dir", str(tmp_path / "ray")]
    args += ["--checkpoint", str(library / "checkpoint"), "--json", "--no-progress"]
    output = tmp_path / "run"
    run = tb(*args, "--engine", "ray", "--decode-cpus", "0.5", output=output)
    killed = None
    deadline = time.monotonic() + RUN_TIMEOUT_S
    try:
        while killed is None and run.poll() is None and time.monotonic() < deadline:
            killed = _busy_ray_worker(run.pid)
            if killed is not None:
                os.kill(killed[0], signal.SIGKILL)
            time.sleep(0.2)
        run.wait(timeout=RUN_TIMEOUT_S)
    finally:
        if run.poll() is None:
            run.kill()
    out, err = Path(f"{output}.out").read_text(), Path(f"{output}.err").read_text()
    assert killed is not None, f"no busy Ray worker seen: {err[-2000:]}"
    if run.returncode != 0:  # the retries gave up: the next run finishes the job (resumable)
        code, report, err = ingest(library, "many", tmp_path / "ray", "--engine", "ray")
        assert code == 0, err
    else:
        report = json.loads(out)
        assert report["ingested"] == 41 and not report["failed"], (killed, report)
    assert_same(contents(tmp_path / "local"), contents(tmp_path / "ray"))
