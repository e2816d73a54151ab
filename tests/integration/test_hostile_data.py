"""A hostile suite for the SDK, the CLI and the storage (issue 10, the data half).

Every case asserts the right typed error (SDK) or exit status with one readable line and no
traceback (CLI: 2 for the user's mistake), and that nothing stored before was lost. Damage is
done to real files: LMDB pages, safetensors records, checkpoints, video files, FIFOs.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tb_reranker import Client
from tb_reranker.cli import main
from tb_reranker.errors import (
    DataCorruptionError,
    InvalidInputError,
    StoreError,
    TBError,
    grpc_status_name,
)
from tb_reranker.index import FrameRecord, LmdbFrameStore, VideoIndex

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def model():
    import torch

    from tb_reranker.model import TokenBinder, TokenBinderConfig

    torch.manual_seed(0)
    return TokenBinder(TokenBinderConfig.tiny()).eval()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, model) -> Path:
    return model.save(tmp_path_factory.mktemp("hostile_ckpt") / "checkpoint")


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory, mp4_writer) -> list[Path]:
    root = tmp_path_factory.mktemp("hostile_videos")
    return [mp4_writer(root / f"v{i}.mp4", mp4_writer.colours[i]) for i in range(3)]


@pytest.fixture
def data_dir(tmp_path: Path, checkpoint: Path) -> Path:
    """A data dir (Milvus Lite file, LMDB store) with the tiny checkpoint."""
    root = tmp_path / "tb_data"
    root.mkdir()
    shutil.copytree(checkpoint, root / "checkpoint")
    return root


def tb(capsys: pytest.CaptureFixture[str], data_dir: Path, *args: str) -> tuple[int, str, str]:
    code = main([*args, "--data-dir", str(data_dir)])
    out = capsys.readouterr()
    return code, out.out, out.err


def tb_process(data_dir: Path, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, "-m", "tb_reranker", *args, "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=str(data_dir),
    )


def assert_user_error(code: int, err: str, *needles: str) -> None:
    """Exit 2, one readable ``tb <cmd>: error: ...`` line, no traceback."""
    assert code == 2, err
    lines = [line for line in err.splitlines() if ": error: " in line]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]


def ingested(capsys, data_dir: Path, videos: list[Path]) -> None:
    code, out, err = tb(capsys, data_dir, "ingest", *map(str, videos), "--json")
    assert code == 0, err
    assert json.loads(out)["ingested"] == len(videos)


def stored_ids(data_dir: Path) -> tuple[list[str], list[str]]:
    """(Milvus ids, store ids) of the data dir."""
    with Client(data_dir=str(data_dir)) as client:
        return client.index.list_ids(), sorted(client.store.list_ids())


# ----------------------------------------------------------------------------- NaN tokens
def _poison_tokens(store_dir: Path, video_id: str, values: np.ndarray) -> None:
    """Overwrite the start of a record's token bytes in place (what bit rot would do)."""
    import lmdb

    env = lmdb.open(str(store_dir), subdir=True)
    with env.begin(write=True) as txn:
        raw = bytearray(txn.get(video_id.encode()))
        (header_len,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8 : 8 + header_len])
        begin = 8 + header_len + header["tokens"]["data_offsets"][0]
        blob = values.astype(np.float16).tobytes()
        raw[begin : begin + len(blob)] = blob
        txn.put(video_id.encode(), bytes(raw))
    env.close()


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
def test_non_finite_tokens_found_reported_repaired(
    capsys, data_dir: Path, videos: list[Path], bad: float
) -> None:
    ingested(capsys, data_dir, videos)
    _poison_tokens(data_dir / "frames", "v1", np.full(7, bad))

    # search: a server-side data error naming the id, DATA_LOSS, not retriable
    with Client(data_dir=str(data_dir)) as client:
        with pytest.raises(DataCorruptionError, match="'v1'") as caught:
            client.search("a red square", limit=3)
        assert grpc_status_name(caught.value) == "DATA_LOSS"
        assert caught.value.retriable is False
        assert client.search("a red square", limit=3, rerank=False)  # broad search still works
    code, _, err = tb(capsys, data_dir, "search", "a red square")
    assert code == 2 and "'v1'" in err and "Traceback" not in err

    # check finds it, repair drops record + row and names the source to re-ingest
    code, out, _ = tb(capsys, data_dir, "check", "--json")
    report = json.loads(out)
    assert code == 1 and report["corrupt"] == ["v1"] and "NaN/inf" in report["reasons"]["v1"]
    code, out, _ = tb(capsys, data_dir, "check", "--repair", "--json")
    report = json.loads(out)
    assert code == 0 and report["lost"] == {"v1": str(videos[1].resolve())}
    assert stored_ids(data_dir) == (["v0", "v2"], ["v0", "v2"])
    # re-ingest re-encodes it (the store no longer holds it: not skipped as unchanged)
    code, out, _ = tb(capsys, data_dir, "ingest", *map(str, videos), "--json")
    assert code == 0 and json.loads(out)["ids"] == ["v1"]
    code, out, _ = tb(capsys, data_dir, "check", "--json")
    assert code == 0 and json.loads(out)["ok"]
    with Client(data_dir=str(data_dir)) as client:
        assert len(client.search("a red square", limit=3)) == 3


def test_reingest_without_repair_reencodes_poisoned(capsys, data_dir, videos) -> None:
    ingested(capsys, data_dir, videos)
    _poison_tokens(data_dir / "frames", "v0", np.full(3, np.nan))
    code, out, _ = tb(capsys, data_dir, "ingest", *map(str, videos), "--json")
    report = json.loads(out)
    assert code == 0 and report["ids"] == ["v0"] and report["unchanged"] == 2
    code, out, _ = tb(capsys, data_dir, "check", "--json")
    assert code == 0 and json.loads(out)["ok"]


# ----------------------------------------------------------------------------- LMDB damage
_FILL = """
import sys
from pathlib import Path

import numpy as np

from tb_reranker.index import FrameRecord, LmdbFrameStore, VideoIndex
from tb_reranker.model import TokenBinder

data_dir, n = Path(sys.argv[1]), int(sys.argv[2])
model = TokenBinder.load(data_dir / "checkpoint", device="cpu")
rng = np.random.default_rng(0)
records = {
    f"v{i:04d}": FrameRecord(
        tokens=rng.standard_normal((8, model.embed_dim)).astype(np.float16),
        timestamps=np.arange(8, dtype=np.float32),
        content_hash=f"h{i}",
        uri=f"/videos/v{i:04d}.mp4",
        fingerprint=model.fingerprint(),
    )
    for i in range(n)
}
with LmdbFrameStore(data_dir / "frames") as store:
    store.put_many(records)
index = VideoIndex(
    str(data_dir / "milvus.db"), dim=model.embed_dim, fingerprint=model.fingerprint()
)
index.create()
index.upsert(
    [
        {"id": i, "cls": r.video_cls(), "content_hash": r.content_hash, "uri": r.uri}
        for i, r in records.items()
    ]
)
index.flush()
"""


def _fill_store(data_dir: Path, n: int = 300) -> None:
    """``n`` seeded records in the store and their rows in Milvus, written by a child process
    (Milvus Lite holds a lock on its file for as long as a process has it open)."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run(
        [sys.executable, "-c", _FILL, str(data_dir), str(n)],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
    )
    assert done.returncode == 0, done.stderr


def _original_tokens(n: int, dim: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.standard_normal((8, dim)).astype(np.float16) for _ in range(n)]


_PLAIN_READ = (
    "import lmdb, sys\n"
    "env = lmdb.open(sys.argv[1], readonly=True, lock=False)\n"
    "print(sum(1 for _ in env.begin().cursor()))\n"
)


def _crashing_damage(store_dir: Path, tmp_path: Path) -> Path:
    """A copy of ``store_dir`` with 64 random bytes written into one page such that a plain
    LMDB cursor read dies by a signal (SIGBUS/SIGSEGV/SIGABRT), found by trying pages from the
    end (deterministic: the store and the bytes are seeded)."""
    data = (store_dir / "data.mdb").read_bytes()
    for page in range(len(data) // 4096 - 1, 1, -1):
        trial = tmp_path / f"damaged_{page}"
        shutil.copytree(store_dir, trial)
        with open(trial / "data.mdb", "r+b") as handle:
            handle.seek(page * 4096 + 16)
            handle.write(np.random.default_rng(page).bytes(64))
        plain = subprocess.run(
            [sys.executable, "-c", _PLAIN_READ, str(trial)], capture_output=True, timeout=60
        )
        if plain.returncode < 0:
            return trial
        shutil.rmtree(trial)
    pytest.fail("no page damage made a plain LMDB read crash")


def test_check_survives_a_store_page_that_crashes_lmdb(
    data_dir: Path, model, tmp_path: Path
) -> None:
    _fill_store(data_dir)
    damaged = _crashing_damage(data_dir / "frames", tmp_path)
    shutil.rmtree(data_dir / "frames")
    shutil.move(damaged, data_dir / "frames")

    found = tb_process(data_dir, "check")
    assert found.returncode == 1, found.stderr  # disagreements: non-zero, not a signal
    assert "store damage:" in found.stdout and "crashed" in found.stdout, found.stdout
    assert "Traceback" not in found.stderr + found.stdout

    fixed = tb_process(data_dir, "check", "--repair", "--json")
    assert fixed.returncode == 0, fixed.stderr
    report = json.loads(fixed.stdout)
    assert report["repaired"] and report["damage"]
    assert any("rebuilt the frame-token store" in a for a in report["actions"])
    assert list((data_dir).glob("frames.damaged-*")), "the damaged copy is kept"
    again = tb_process(data_dir, "check", "--json")
    assert again.returncode == 0, again.stdout + again.stderr
    assert json.loads(again.stdout)["ok"]
    milvus_ids, store_ids = stored_ids(data_dir)
    assert milvus_ids == store_ids and 0 < len(store_ids) < 300
    # every entry that survived is intact (bit-exact against the seeded originals)
    originals = _original_tokens(300, model.embed_dim)
    with LmdbFrameStore(data_dir / "frames") as store:
        for video_id, record in store.get_many(store_ids).items():
            np.testing.assert_array_equal(record.tokens, originals[int(video_id[1:])])


@pytest.mark.parametrize(
    "damage",
    ["truncate", "zero_meta", "garbage_file", "lock_garbage"],
)
def test_check_on_damaged_store_files(data_dir: Path, model, damage: str) -> None:
    _fill_store(data_dir, n=40)
    store = data_dir / "frames"
    path = store / "data.mdb"
    if damage == "truncate":
        with open(path, "r+b") as handle:
            handle.truncate(os.path.getsize(path) // 2)
    elif damage == "zero_meta":
        with open(path, "r+b") as handle:
            handle.write(b"\0" * 8192)
    elif damage == "garbage_file":
        path.write_bytes(np.random.default_rng(5).bytes(64 * 1024))
    else:
        (store / "lock.mdb").write_bytes(b"\xff" * 100)
    result = tb_process(data_dir, "check")
    assert result.returncode in (0, 1, 2), result  # a clean exit, never a signal
    text = result.stdout + result.stderr
    assert "Traceback" not in text
    if result.returncode == 2:
        assert len([line for line in result.stderr.splitlines() if ": error: " in line]) == 1
    elif damage != "lock_garbage":
        assert "store damage" in result.stdout or "only_in_index" in result.stdout
