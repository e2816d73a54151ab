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
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tb_reranker import Client
from tb_reranker.cli import main
from tb_reranker.errors import DataCorruptionError, NotFoundError
from tb_reranker.stores import LmdbFrameStore
from tb_reranker.wire.status import grpc_status_name

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def model():
    import torch

    from tb_reranker.model import TokenBinder, TokenBinderConfig

    torch.manual_seed(0)
    return TokenBinder(TokenBinderConfig.tiny()).eval()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, model) -> Path:
    from tb_reranker.model import save_checkpoint

    return save_checkpoint(model, tmp_path_factory.mktemp("hostile_ckpt") / "checkpoint")


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
    try:
        code = main([*args, "--data-dir", str(data_dir)])
    except SystemExit as exc:  # a usage error (argparse) ends the process: exit 2
        code = int(exc.code or 0)
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

from tb_reranker.index import VideoIndex
from tb_reranker.stores import FrameRecord, LmdbFrameStore
from tb_reranker.model import load_checkpoint

data_dir, n = Path(sys.argv[1]), int(sys.argv[2])
model = load_checkpoint(data_dir / "checkpoint", device="cpu")
rng = np.random.default_rng(0)
records = {
    f"v{i:04d}": FrameRecord(
        tokens=rng.standard_normal((8, model.embed_dim)).astype(np.float16),
        timestamps=np.arange(8, dtype=np.float32),
        content_hash=f"h{i}",
        uri=f"/videos/v{i:04d}.mp4",
        fingerprint=model.vision_fingerprint(),
    )
    for i in range(n)
}
with LmdbFrameStore(data_dir / "frames") as store:
    store.put_many(records)
index = VideoIndex(
    str(data_dir / "milvus.db"), dim=model.embed_dim, fingerprint=model.vision_fingerprint()
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


# ----------------------------------------------------------------------------- CLI user errors
@pytest.fixture(scope="module")
def shared_dir(tmp_path_factory: pytest.TempPathFactory, checkpoint: Path, videos) -> Path:
    """One data dir with the three videos ingested, shared by the read-only hostile cases."""
    root = tmp_path_factory.mktemp("hostile_shared") / "tb_data"
    root.mkdir()
    shutil.copytree(checkpoint, root / "checkpoint")
    assert main(["ingest", *map(str, videos), "--data-dir", str(root)]) == 0
    return root


def _write(path: Path, data: bytes | str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        path.write_text(data, encoding="utf-8")
    else:
        path.write_bytes(data)
    return str(path)


def _user_error_cases(tmp: Path, videos: list[Path]) -> dict[str, tuple[list[str], str]]:
    """name -> (argv without --data-dir, text expected in the error line)."""
    good = str(videos[0])
    loop = tmp / "loop.txt"
    return {
        "delete-traversal": (["delete", "../etc/passwd"], "invalid video id"),
        "delete-empty-id": (["delete", ""], "invalid video id"),
        "delete-nul": (["delete", "a\x00b"], "invalid video id"),
        "delete-slash": (["delete", "a/b"], "invalid video id"),
        "delete-unknown": (["delete", "never_there"], "no such video id: never_there"),
        "delete-unknowns": (["delete", "nope1", "nope2"], "no such video ids: nope1, nope2"),
        "ingest-empty-list": (["ingest", "@" + _write(tmp / "empty.txt", b"")], "no entries"),
        "ingest-comment-list": (
            ["ingest", "@" + _write(tmp / "comments.txt", "# x\n\n")],
            "no entries",
        ),
        "ingest-binary-list": (
            ["ingest", "@" + _write(tmp / "bin.txt", b"\xff\xfe\x00")],
            "cannot read list file",
        ),
        "ingest-self-list": (
            ["ingest", "@" + _write(loop, f"@{loop.name}\n")],
            "includes itself",
        ),
        "ingest-missing-list": (["ingest", f"@{tmp / 'absent.txt'}"], "cannot read list file"),
        "ingest-missing-file": (["ingest", str(tmp / "absent.mp4")], "no such file"),
        "ingest-empty-dir": (["ingest", str((tmp / "emptydir").resolve())], "no video file"),
        "ingest-glob-nothing": (["ingest", str(tmp / "*.nothing")], "matches no file"),
        "ingest-bad-name": (
            ["ingest", _write(tmp / "my vidéo.mp4", Path(good).read_bytes())],
            "invalid video id",
        ),
        "ingest-metadata-not-json": (
            ["ingest", good, "--metadata", _write(tmp / "m1.json", "{not json")],
            "not valid JSON",
        ),
        "ingest-metadata-list": (
            ["ingest", good, "--metadata", _write(tmp / "m2.json", "[1, 2]")],
            "JSON object",
        ),
        "ingest-metadata-reserved": (
            ["ingest", good, "--metadata", _write(tmp / "m3.json", '{"v0": {"cls": 1}}')],
            "reserved",
        ),
        "ingest-metadata-dollar": (
            ["ingest", good, "--metadata", _write(tmp / "m4.json", '{"v0": {"$meta": 1}}')],
            "reserved",
        ),
        "ingest-metadata-scalar": (
            ["ingest", good, "--metadata", _write(tmp / "m5.json", '{"v0": 3}')],
            "must be a dict",
        ),
        "ingest-metadata-missing": (
            ["ingest", good, "--metadata", str(tmp / "nowhere.json")],
            "does not exist",
        ),
        "ingest-ids-traversal": (
            ["ingest", good, "--ids", _write(tmp / "i1.json", json.dumps({good: "../x"}))],
            "invalid video ids",
        ),
        "ingest-ids-duplicate": (
            [
                "ingest",
                good,
                str(videos[1]),
                "--ids",
                _write(tmp / "i2.json", json.dumps({good: "same", str(videos[1]): "same"})),
            ],
            "same video id",
        ),
        "ingest-metadata-nan": (
            ["ingest", good, "--metadata", _write(tmp / "m6.json", '{"v0": {"rating": NaN}}')],
            "finite",
        ),
        "ingest-metadata-nested-inf": (
            [
                "ingest",
                good,
                "--metadata",
                _write(tmp / "m7.json", '{"v0": {"a": [1, {"b": -Infinity}]}}'),
            ],
            "finite",
        ),
        "ingest-metadata-huge-int": (
            ["ingest", good, "--metadata", _write(tmp / "m8.json", '{"v0": {"n": 1e400}}')],
            "finite",
        ),
        "search-uri-proc": (["search", "red", "--uri", "/proc/self/x.db"], "Milvus Lite"),
        "ingest-uri-under-file": (
            ["ingest", good, "--uri", _write(tmp / "plain.txt", "x") + "/x.db"],
            "Milvus Lite",
        ),
        "drop-without-yes": (["collection", "drop"], "--yes"),
        "ingest-batch-zero": (["ingest", good, "--batch-size", "0"], "batch-size"),
        "search-limit-zero": (["search", "red", "--limit", "0"], "limit"),
        "search-limit-huge": (["search", "red", "--limit", "100000000"], "limit"),
        "search-blank-text": (["search", "   "], "non-empty"),
        "search-long-text": (["search", "x" * 5000], "limit is 2048"),
    }


CASE_NAMES = [
    "delete-traversal",
    "delete-empty-id",
    "delete-nul",
    "delete-slash",
    "delete-unknown",
    "delete-unknowns",
    "ingest-empty-list",
    "ingest-comment-list",
    "ingest-binary-list",
    "ingest-self-list",
    "ingest-missing-list",
    "ingest-missing-file",
    "ingest-empty-dir",
    "ingest-glob-nothing",
    "ingest-bad-name",
    "ingest-metadata-not-json",
    "ingest-metadata-list",
    "ingest-metadata-reserved",
    "ingest-metadata-dollar",
    "ingest-metadata-scalar",
    "ingest-metadata-missing",
    "ingest-ids-traversal",
    "ingest-ids-duplicate",
    "ingest-metadata-nan",
    "ingest-metadata-nested-inf",
    "ingest-metadata-huge-int",
    "search-uri-proc",
    "ingest-uri-under-file",
    "drop-without-yes",
    "ingest-batch-zero",
    "search-limit-zero",
    "search-limit-huge",
    "search-blank-text",
    "search-long-text",
]


@pytest.mark.parametrize("name", CASE_NAMES)
def test_cli_user_errors_exit_2_and_lose_nothing(
    capsys, shared_dir: Path, videos, tmp_path: Path, name: str
) -> None:
    (tmp_path / "emptydir").mkdir()
    cases = _user_error_cases(tmp_path, videos)
    assert sorted(cases) == sorted(CASE_NAMES)
    argv, needle = cases[name]
    code, _, err = tb(capsys, shared_dir, *argv)
    assert_user_error(code, err, needle)
    assert stored_ids(shared_dir) == (["v0", "v1", "v2"],) * 2


def test_cli_check_on_a_fresh_dir_is_a_clean_error(capsys, data_dir: Path) -> None:
    code, _, err = tb(capsys, data_dir, "check")
    assert_user_error(code, err, "does not exist")


# ----------------------------------------------------------------------------- hostile files
@pytest.mark.timeout(180)
def test_fifo_device_and_broken_videos_fail_alone(
    capsys, data_dir: Path, videos, tmp_path: Path
) -> None:
    """A FIFO or a device named .mp4 used to hang ingestion forever; broken files fail alone."""
    ingested(capsys, data_dir, videos[:1])
    batch = tmp_path / "batch"
    batch.mkdir()
    os.mkfifo(batch / "fifo.mp4")
    (batch / "zero.mp4").symlink_to("/dev/zero")
    (batch / "empty.mp4").write_bytes(b"")
    (batch / "garbage.mp4").write_bytes(np.random.default_rng(1).bytes(4096))
    (batch / "truncated.mp4").write_bytes(videos[1].read_bytes()[:300])
    (batch / "text.mp4").write_text("hello, not a video\n")
    (batch / "dir.mp4").mkdir()
    shutil.copy(videos[2], batch / "good.mp4")
    inputs = [str(batch / n) for n in ("fifo.mp4", "zero.mp4", "good.mp4")] + [str(batch)]
    code, out, err = tb(capsys, data_dir, "ingest", *inputs, "--json")
    report = json.loads(out)
    assert code == 1, err
    failed = {Path(f["path"]).name: f["reason"] for f in report["failed"]}
    assert "not a regular file" in failed["fifo.mp4"] and "not a regular file" in failed["zero.mp4"]
    assert {"empty.mp4", "garbage.mp4", "truncated.mp4", "text.mp4"} <= set(failed)
    assert report["ids"] == ["good"]
    assert stored_ids(data_dir) == (["good", "v0"],) * 2
    assert "Traceback" not in err


def test_changed_metadata_of_unchanged_file_is_written(capsys, data_dir: Path, videos) -> None:
    meta = data_dir / "meta.json"
    meta.write_text(json.dumps({"v0": {"lang": "en", "year": 2020}}))
    code, _, err = tb(capsys, data_dir, "ingest", *map(str, videos), "--metadata", str(meta))
    assert code == 0, err
    meta.write_text(json.dumps({"v0": {"lang": "fr", "year": 2021, "tags": ["a", "b"]}}))
    code, out, err = tb(
        capsys, data_dir, "ingest", *map(str, videos), "--metadata", str(meta), "--json"
    )
    report = json.loads(out)
    assert code == 0 and report["metadata_updated"] == 1 and report["ingested"] == 0, err
    assert report["unchanged"] == 2 and report["ids"] == ["v0"]
    with Client(data_dir=str(data_dir)) as client:
        before = client.index.get(["v0"], with_vectors=True)["v0"]
        hits = client.search("a red square", limit=3, filter='lang == "fr" and year == 2021')
        assert [h.id for h in hits] == ["v0"] and hits[0].metadata["tags"] == ["a", "b"]
        assert client.store.get("v0").metadata == {"lang": "fr", "year": 2021, "tags": ["a", "b"]}
    # the same metadata again: nothing to do
    code, out, _ = tb(
        capsys, data_dir, "ingest", *map(str, videos), "--metadata", str(meta), "--json"
    )
    assert json.loads(out)["metadata_updated"] == 0 and json.loads(out)["unchanged"] == 3
    with Client(data_dir=str(data_dir)) as client:
        after = client.index.get(["v0"], with_vectors=True)["v0"]
    np.testing.assert_array_equal(before["cls"], after["cls"])  # the vector was kept
    code, out, _ = tb(capsys, data_dir, "check", "--json")
    assert code == 0 and json.loads(out)["ok"]


def test_delete_reports_unknown_ids(capsys, data_dir: Path, videos) -> None:
    ingested(capsys, data_dir, videos)
    code, out, err = tb(capsys, data_dir, "delete", "v1", "ghost", "--json")
    assert code == 1, err
    assert json.loads(out) == {"deleted": 1, "ids": ["v1"], "not_found": ["ghost"]}
    assert stored_ids(data_dir) == (["v0", "v2"],) * 2
    with Client(data_dir=str(data_dir)) as client:
        assert client.delete(["v2", "ghost"]) == 1
        with pytest.raises(NotFoundError, match="ghost"):
            client.delete(["v0", "ghost"], missing_ok=False)
        assert client.index.list_ids() == ["v0"]  # nothing deleted by the refused call


def test_unparsable_record_found_and_repaired(capsys, data_dir: Path, videos) -> None:
    ingested(capsys, data_dir, videos)
    import lmdb

    env = lmdb.open(str(data_dir / "frames"), subdir=True)
    with env.begin(write=True) as txn:
        txn.put(b"v2", b"\x00" * 5)
        txn.put(b"stray", b"garbage that is not safetensors")
    env.close()
    with Client(data_dir=str(data_dir)) as client, pytest.raises(DataCorruptionError, match="v2"):
        client.search("a blue square", limit=3)
    code, out, _ = tb(capsys, data_dir, "check", "--repair", "--json")
    report = json.loads(out)
    assert code == 0 and report["corrupt"] == ["stray", "v2"]
    assert report["lost"] == {"stray": "", "v2": str(videos[2].resolve())}
    assert stored_ids(data_dir) == (["v0", "v1"],) * 2


@pytest.mark.parametrize("damage", ["truncate", "flip", "config-garbage", "no-config"])
def test_damaged_checkpoint_is_a_clean_cli_error(
    capsys, shared_dir: Path, tmp_path: Path, damage: str
) -> None:
    broken = tmp_path / "ckpt"
    shutil.copytree(shared_dir / "checkpoint", broken)
    weights = broken / "model.safetensors"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:1000])
    elif damage == "flip":
        data = bytearray(weights.read_bytes())
        data[len(data) // 2] ^= 0x55
        weights.write_bytes(bytes(data))
    elif damage == "config-garbage":
        (broken / "config.json").write_bytes(b"\x00\xff{")
    else:
        (broken / "config.json").unlink()
    code, _, err = tb(capsys, shared_dir, "search", "red", "--checkpoint", str(broken))
    assert_user_error(code, err)
    assert stored_ids(shared_dir) == (["v0", "v1", "v2"],) * 2


def test_non_finite_tokens_over_grpc_are_data_loss(tmp_path: Path) -> None:
    """The sidecar reports a poisoned record as DATA_LOSS naming the id (the server's data, not
    the caller's request), and keeps serving the others."""
    import grpc

    from tb_reranker._pb.tb_reranker.v1 import reranker_pb2 as pb
    from tb_reranker._pb.tb_reranker.v1 import reranker_pb2_grpc as pb_grpc
    from tb_reranker.server.config import ServerConfig
    from tb_reranker.server.testing import ServerThread, build_tiny_components

    components, ids = build_tiny_components(tmp_path, num_videos=6)
    store = components.reranker.store

    def poison(txn) -> None:
        raw = bytearray(txn.get(b"vid-003"))
        (header_len,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8 : 8 + header_len])
        begin = 8 + header_len + header["tokens"]["data_offsets"][0]
        raw[begin : begin + 8] = np.full(4, np.nan, dtype=np.float16).tobytes()
        txn.put(b"vid-003", bytes(raw))

    store._write(poison)  # noqa: SLF001
    with (
        ServerThread(ServerConfig(port=0), lambda: components) as running,
        grpc.insecure_channel(running.target) as channel,
    ):
        rerank = pb_grpc.RerankServiceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            rerank.Rerank(pb.RerankRequest(text="a dog", candidates_ids=ids), timeout=30)
        assert caught.value.code() == grpc.StatusCode.DATA_LOSS
        assert "'vid-003'" in caught.value.details() and "NaN/inf" in caught.value.details()
        good = [i for i in ids if i != "vid-003"]
        reply = rerank.Rerank(pb.RerankRequest(text="a dog", candidates_ids=good), timeout=30)
        assert len(reply.ranks) == len(good)


@pytest.mark.timeout(300)
def test_kill_9_during_ingest_then_rerun_converges(
    capsys, data_dir: Path, mp4_writer, tmp_path: Path
) -> None:
    """``kill -9`` a ``tb ingest`` process once it has stored its first video; re-running the
    same command converges: every video once in both places, check OK."""
    import signal
    import time

    folder = tmp_path / "many"
    for i in range(8):
        mp4_writer(folder / f"k{i}.mp4", mp4_writer.colours[i % 6], frames=6 + i)
    keep = mp4_writer(tmp_path / "keep.mp4", mp4_writer.colours[0])
    # in child processes only: Milvus Lite locks its file for the process that opened it
    assert tb_process(data_dir, "ingest", str(keep)).returncode == 0
    env = dict(os.environ, PYTHONPATH=str(REPO))
    child = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tb_reranker",
            "ingest",
            str(folder),
            "--batch-size",
            "1",
            "--workers",
            "1",
            "--data-dir",
            str(data_dir),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
        cwd=str(tmp_path),
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and child.poll() is None:
            with LmdbFrameStore(data_dir / "frames", readonly=True) as store:
                if len(store) >= 2:  # "keep" + at least one of this batch
                    break
            time.sleep(0.02)
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait(30)
    assert child.returncode == -signal.SIGKILL  # killed mid-way, not finished
    code, out, err = tb(capsys, data_dir, "ingest", str(folder), "--json")
    report = json.loads(out)
    assert code == 0, err
    assert report["ingested"] + report["unchanged"] == 8
    assert report["unchanged"] + report["reindexed"] >= 1  # the killed run had written some
    assert stored_ids(data_dir) == (sorted(["keep", *(f"k{i}" for i in range(8))]),) * 2
    code, out, _ = tb(capsys, data_dir, "check", "--json")
    assert code == 0 and json.loads(out)["ok"]


# ----------------------------------------------------------------------------- round two (#20)
class _Crash(RuntimeError):
    pass


# every instant of a delete: before anything, inside the store's delete (half of the ids
# gone), between the store and Milvus, inside Milvus's delete, after both
DELETE_INSTANTS = ["before", "store-partial", "between", "index-partial", "after"]


@pytest.mark.parametrize("instant", DELETE_INSTANTS)
def test_deleted_videos_stay_deleted_whatever_instant_a_crash_hits(
    milvus_lite_uri: str, unique_collection: str, tmp_path: Path, model, videos, instant: str
) -> None:
    """A crash between the Milvus delete and the store delete used to leave tokens without a
    row, which ``check --repair`` re-indexed: the deleted videos came back."""
    from tb_reranker.index import VideoIndex, check, delete, ingest

    armed = [True]  # one crash: repair's own deletes run normally

    def crash_at(point: str) -> None:
        if armed[0] and instant == point:
            armed[0] = False
            raise _Crash(point)

    class Index(VideoIndex):
        def delete(self, ids):
            ids = list(ids)
            if armed[0] and instant == "index-partial":
                super().delete(ids[:1])
                crash_at("index-partial")
            super().delete(ids)
            crash_at("after")

    class Store(LmdbFrameStore):
        def delete_many(self, ids):
            ids = list(ids)
            crash_at("before")
            if armed[0] and instant == "store-partial":
                super().delete_many(ids[:1])
                crash_at("store-partial")
            count = super().delete_many(ids)
            crash_at("between")
            return count

    index = Index(milvus_lite_uri, collection=unique_collection)
    store = Store(tmp_path / "frames")
    try:
        ingest(videos, model=model, index=index, store=store, progress=False)
        with pytest.raises(_Crash):
            delete(["v0", "v2"], index=index, store=store)
        # a video the crash removed from either place was deleted: it must stay deleted
        touched = {"v0", "v2"} - (set(index.list_ids()) & set(store.list_ids()))
        # nobody re-runs the delete: repair alone must respect it
        assert check(index, store, repair=True, model=model).repaired
        kept = (index.list_ids(), sorted(store.list_ids()))
        if instant == "before":  # nothing was deleted yet: nothing may be lost either
            assert kept == (["v0", "v1", "v2"],) * 2
        else:
            assert "v1" in kept[0] and "v1" in kept[1]
            # whatever of v0/v2 the crash had removed anywhere stays removed everywhere
            assert set(kept[0]) == set(kept[1]), kept
            assert touched and not touched & (set(kept[0]) | set(kept[1])), (touched, kept)
        assert check(index, store, model=model).ok
    finally:
        store.close()
        index.close()


def _held_lite(data_dir: Path) -> subprocess.Popen:
    """A process that opens the data dir's Milvus Lite database and keeps it."""
    code = (
        "import sys, time\n"
        "from tb_reranker import Client\n"
        "client = Client(data_dir=sys.argv[1]); client.index.list_ids()\n"
        "print('ready', flush=True); time.sleep(120)\n"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(data_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )
    assert holder.stdout.readline().strip() == "ready"
    return holder


@pytest.mark.timeout(300)
def test_destructive_commands_refuse_a_non_interactive_stdin(shared_dir: Path) -> None:
    """``echo | tb collection drop`` (no --yes) used to drop the collection."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    for stdin in ("\n", "y\n", ""):
        found = subprocess.run(
            [
                sys.executable,
                "-m",
                "tb_reranker",
                "collection",
                "drop",
                "--data-dir",
                str(shared_dir),
            ],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=240,
            env=env,
        )
        assert_user_error(found.returncode, found.stderr, "--yes", "not a terminal")
    found = subprocess.run(
        [sys.executable, "-m", "milvus_setup", "drop", "--uri", str(shared_dir / "milvus.db")],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
    )
    assert found.returncode == 2 and "--yes" in found.stderr, found.stderr
    assert stored_ids(shared_dir) == (["v0", "v1", "v2"],) * 2


@pytest.mark.timeout(400)
def test_cli_into_a_closed_pipe_and_on_a_held_lite_database(data_dir: Path, videos) -> None:
    """``tb search ... | head`` used to exit 1 with a BrokenPipeError line; any command on a
    Lite database another process holds printed Lite's ~20-line DataDirLockedError traceback.
    (Every tb runs in a child: Lite locks its database for the process that opened it.)"""
    assert tb_process(data_dir, "ingest", *map(str, videos)).returncode == 0
    env = dict(os.environ, PYTHONPATH=str(REPO))
    child = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tb_reranker",
            "search",
            "red",
            "--json",
            "--data-dir",
            str(data_dir),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    child.stdout.close()  # the reader is gone before the first line is written
    err = child.stderr.read().decode()
    child.wait(240)
    assert child.returncode == 141, err  # 128 + SIGPIPE, as `yes | head` gives
    assert "error" not in err.lower() and "Traceback" not in err, err

    holder = _held_lite(data_dir)
    try:
        for argv in (["search", "red"], ["delete", "v0"], ["check"]):
            found = tb_process(data_dir, *argv)
            assert_user_error(
                found.returncode, found.stderr, f"in use by process {holder.pid}", "tb serve"
            )
    finally:
        holder.kill()
        holder.wait(30)
    assert stored_ids(data_dir) == (["v0", "v1", "v2"],) * 2


@pytest.mark.timeout(300)
def test_directory_ingest_bad_names_fail_alone_and_loops_end(
    data_dir: Path, videos, tmp_path: Path
) -> None:
    """One file name that is no valid id used to abort the whole directory; a name with a
    newline split the error line; a glob through ``a/up -> ..`` never ended."""
    lib = tmp_path / "lib"
    (lib / "a").mkdir(parents=True)
    shutil.copy(videos[0], lib / "good.mp4")
    shutil.copy(videos[1], lib / "a" / "also_good.mp4")
    shutil.copy(videos[2], lib / "my vidéo.mp4")
    shutil.copy(videos[2], lib / "a" / "two\nlines.mp4")
    (lib / "a" / "up").symlink_to("..")
    (lib / "a" / "down").symlink_to(".")
    found = tb_process(data_dir, "ingest", str(lib / "**" / "*.mp4"), timeout=240)
    assert found.returncode == 1, found.stderr
    failed = [line for line in found.stdout.splitlines() if line.startswith("  failed: ")]
    assert len(failed) == 2 and "Traceback" not in found.stderr, found.stdout
    assert any("'" in line and "two\\nlines.mp4" in line for line in failed), failed
    assert "ingested 2" in found.stdout and "failed 2" in found.stdout, found.stdout
    again = tb_process(data_dir, "ingest", str(lib), "--json", timeout=240)
    report = json.loads(again.stdout)
    assert report["unchanged"] == 2 and len(report["failed"]) == 2, again.stderr
    assert stored_ids(data_dir) == (["also_good", "good"],) * 2


def _huge_video(path: Path, side: int, frames: int) -> Path:
    """A few black ``side``x``side`` H.264 frames (a small file), made in a child process so
    the encoder's memory is not this process's."""
    code = (
        "import sys, av\n"
        "side = int(sys.argv[2])\n"
        "with av.open(sys.argv[1], 'w') as c:\n"
        "    s = c.add_stream('libx264', rate=5); s.width = s.height = side\n"
        "    s.pix_fmt = 'yuv420p'; s.options = {'preset': 'ultrafast'}\n"
        "    s.codec_context.thread_count = 1\n"
        "    for _ in range(int(sys.argv[3])):\n"
        "        f = av.VideoFrame(side, side, 'yuv420p')\n"
        "        for p in f.planes: p.update(bytes(p.buffer_size))\n"
        "        for k in s.encode(f): c.mux(k)\n"
        "    for k in s.encode(): c.mux(k)\n"
    )
    subprocess.run(
        [sys.executable, "-c", code, str(path), str(side), str(frames)], check=True, timeout=240
    )
    return path


_PEAK_RSS = (
    "import json, resource, sys\n"
    "from tb_reranker.video import decode_video\n"
    "from tb_reranker.errors import VideoDecodeError\n"
    "decode_video(sys.argv[1], num_frames=4, image_size=32)  # imports, codecs: the baseline\n"
    "rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024\n"
    "base = rss()\n"
    "try:\n"
    "    decode_video(sys.argv[2], num_frames=8, image_size=32)\n"
    "    outcome = 'decoded'\n"
    "except VideoDecodeError as exc:\n"
    "    outcome = str(exc)\n"
    "print(json.dumps({'growth_mb': rss() - base, 'outcome': outcome}))\n"
)


@pytest.mark.timeout(400)
@pytest.mark.parametrize(("side", "frames", "bound_mb"), [(8192, 3, 400)])
def test_huge_frames_do_not_take_gigabytes(
    tmp_path: Path, videos, side: int, frames: int, bound_mb: int
) -> None:
    """An 8192x8192 video (a 0.2 MB file) used to add 1-1.5 GB to the decoding process. Frames
    above 8K UHD are now refused before decoding (what remains is FFmpeg's stream probe).
    Peak RSS growth measured in a child process (ru_maxrss)."""
    huge = _huge_video(tmp_path / f"huge{side}.mp4", side, frames)
    assert huge.stat().st_size < 2_000_000
    found = subprocess.run(
        [sys.executable, "-c", _PEAK_RSS, str(videos[0]), str(huge)],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )
    assert found.returncode == 0, found.stderr
    result = json.loads(found.stdout)
    assert f"{side}x{side}" in result["outcome"] and "limit" in result["outcome"], result
    assert result["growth_mb"] < bound_mb, result  # before: 970-1,480 MB, decoded; now ~150


# tb init: shapes and weights are checked before a checkpoint is written
_SHAPES = [
    ("", "embed_dim"),
    ("vision_cfg", "image_size"),
    ("vision_cfg", "patch_size"),
    ("vision_cfg", "width"),
    ("vision_cfg", "head_width"),
    ("vision_cfg", "layers"),
    ("text_cfg", "width"),
    ("text_cfg", "heads"),
    ("text_cfg", "context_length"),
]


@pytest.fixture(scope="module")
def clip_weights(tmp_path_factory: pytest.TempPathFactory, tiny_clip) -> Path:
    return tiny_clip.save(tmp_path_factory.mktemp("clip") / "tiny.safetensors")


def _init(capsys, *argv: str) -> tuple[int, str]:
    code = main(["init", *argv])
    return code, capsys.readouterr().err


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    st.sampled_from(_SHAPES),
    st.one_of(
        st.integers(-3, 3),
        st.integers(5, 100),
        st.just(10**9),
        st.floats(allow_nan=True),
        st.sampled_from(["8", None, True, [8]]),
    ),
)
def test_init_config_values_build_or_exit_2(
    capsys, tmp_path_factory, clip_weights: Path, shape, value
) -> None:
    """``patch_size: 0`` / ``embed_dim: -1`` used to exit 1 with ZeroDivisionError /
    RuntimeError; any value now builds a working checkpoint or is exit 2 with one line."""
    from tb_reranker.model.config import TINY_CLIP_CFG

    section, key = shape
    cfg = json.loads(json.dumps(TINY_CLIP_CFG))
    (cfg[section] if section else cfg)[key] = value
    tmp = tmp_path_factory.mktemp("init")
    config = tmp / "cfg.json"
    config.write_text(json.dumps(cfg))
    code, err = _init(
        capsys, "--config", str(config), "--pretrained", str(clip_weights), "--out", str(tmp / "o")
    )
    if code == 0:
        import torch

        from tb_reranker.model import load_checkpoint

        model = load_checkpoint(tmp / "o", device="cpu")
        with torch.no_grad():
            assert torch.isfinite(model.encode_text(["a red square"])).all()
    else:
        assert_user_error(code, err)
        assert not (tmp / "o" / "config.json").exists()


def test_init_refuses_nan_weights_and_pickles_in_one_line(
    capsys, tmp_path: Path, tiny_clip, clip_weights: Path
) -> None:
    """NaN weights used to make a checkpoint that failed later; a refused pickle printed six
    lines that suggested ``weights_only=False``."""
    import torch
    from safetensors.torch import save_file

    from tb_reranker.model.config import TINY_CLIP_CFG

    config = tmp_path / "cfg.json"
    config.write_text(json.dumps(TINY_CLIP_CFG))
    state = {k: v.contiguous().clone() for k, v in tiny_clip.build().state_dict().items()}
    state["visual.conv1.weight"][0, 0, 0, 0] = float("nan")
    save_file(state, str(tmp_path / "nan.safetensors"))
    torch.save({"state_dict": _Evil()}, tmp_path / "evil.pt")
    for weights, needle in (("nan.safetensors", "NaN/inf"), ("evil.pt", "pickle")):
        code, err = _init(
            capsys,
            "--config",
            str(config),
            "--pretrained",
            str(tmp_path / weights),
            "--out",
            str(tmp_path / "out"),
        )
        assert_user_error(code, err, needle)
        assert "weights_only=False" not in err and "weights_only` set to `False" not in err
        assert not (tmp_path / "out" / "config.json").exists()
    found = subprocess.run(
        [
            sys.executable,
            "-m",
            "tb_reranker",
            "init",
            "--config",
            str(config),
            "--pretrained",
            str(tmp_path / "nan.safetensors"),
            "--out",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=240,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )
    assert_user_error(found.returncode, found.stderr, "NaN/inf")


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))
