"""``tb ingest``, ``tb check``, ``tb delete`` and ``tb collection`` end to end (Milvus Lite, LMDB)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tb_reranker.cli import main


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory, mp4_writer) -> Path:
    import torch

    from tb_reranker.model import TokenBinder, TokenBinderConfig, save_checkpoint

    root = tmp_path_factory.mktemp("tb_data")
    torch.manual_seed(0)
    save_checkpoint(TokenBinder(TokenBinderConfig.tiny()), root / "checkpoint")
    for i in range(3):
        mp4_writer(root / "videos" / f"cli{i}.mp4", mp4_writer.colours[i])
    (root / "videos" / "bad.mp4").write_bytes(b"not a video")
    return root


def tb(capsys: pytest.CaptureFixture[str], data_dir: Path, *args: str) -> tuple[int, str, str]:
    code = main([*args, "--data-dir", str(data_dir)])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_ingest_check_delete(capsys: pytest.CaptureFixture[str], data_dir: Path) -> None:
    meta = data_dir / "meta.json"
    meta.write_text(json.dumps({"cli1": {"lang": "en"}}))
    code, out, err = tb(
        capsys, data_dir, "ingest", str(data_dir / "videos"), "--json", "--metadata", str(meta)
    )
    assert code == 1, err  # one bad file
    report = json.loads(out)
    assert report["ingested"] == 3 and [f["path"] for f in report["failed"]] == [
        str(data_dir / "videos" / "bad.mp4")
    ]
    code, out, _ = tb(capsys, data_dir, "ingest", str(data_dir / "videos" / "cli*.mp4"), "--json")
    assert code == 0 and json.loads(out)["unchanged"] == 3

    code, out, _ = tb(capsys, data_dir, "check", "--json")
    assert code == 0 and json.loads(out)["ok"] is True

    code, out, _ = tb(capsys, data_dir, "collection", "describe")
    info = json.loads(out)
    assert code == 0 and info["row_count"] >= 0 and info["dim"] == 64
    code, out, _ = tb(capsys, data_dir, "collection", "check-schema")
    assert code == 0 and json.loads(out)["ok"] is True

    code, out, _ = tb(capsys, data_dir, "delete", "cli0", "--json")
    assert code == 0 and json.loads(out)["deleted"] == 1
    code, out, err = tb(capsys, data_dir, "delete", "../etc/passwd")
    assert code == 2 and "invalid video id" in err

    from tb_reranker.stores import LmdbFrameStore

    with LmdbFrameStore(data_dir / "frames") as store:
        assert sorted(store.list_ids()) == ["cli1", "cli2"]
        store.put_many({"stray": store.get_many(["cli1"])["cli1"]})
    code, out, _ = tb(capsys, data_dir, "check")
    assert code == 1 and "only_in_store: 1 (stray)" in out
    code, out, _ = tb(capsys, data_dir, "check", "--repair", "--json")
    assert code == 0 and json.loads(out)["repaired"] is True
    assert json.loads(tb(capsys, data_dir, "check", "--json")[1])["ok"] is True


def test_cli_collection_errors(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = tb(capsys, tmp_path, "collection", "describe", "--collection", "nothing_here")
    assert code == 2 and "does not exist" in err
    code, _, err = tb(capsys, tmp_path, "collection", "create")
    assert code == 2 and "--dim" in err
    code, out, _ = tb(capsys, tmp_path, "collection", "create", "--dim", "8", "--fingerprint", "f")
    assert code == 0 and json.loads(out)["created"] is True
    code, out, _ = tb(capsys, tmp_path, "collection", "drop", "--yes")
    assert code == 0 and json.loads(out)["dropped"] is True
