"""``tb ingest --bulk`` (issue 23) end to end: the CLI in a subprocess, real synthetic videos, a
real Milvus 2.3.5 server (local storage: the import files are staged under its data directory).

The rows a bulk ingest imports are the rows an upsert ingest of the same files writes (same keys,
vectors and fields), a second bulk run changes nothing, and the refusals are one line with exit
2: ``--bulk`` on Milvus Lite (no import there), ``--bulk`` without a staging location,
``--bulk-staging`` without ``--bulk``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytestmark = [pytest.mark.server, pytest.mark.slow]


def tb(*args: str) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TB_BULK_STAGING"}
    done = subprocess.run(
        [sys.executable, "-m", "tb_reranker", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return done.returncode, done.stdout, done.stderr


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``root/checkpoint`` (a tiny model) and ``root/videos``: 5 short clips and one 40 s file
    of several segments."""
    import torch

    from tb_reranker.model import TokenBinder, TokenBinderConfig, save_checkpoint

    root = tmp_path_factory.mktemp("bulk_library")
    torch.manual_seed(0)
    save_checkpoint(TokenBinder(TokenBinderConfig.tiny()), root / "checkpoint")
    for args in (("short", "--train", "5", "--test", "0"), ("long", "--long", "--pairs", "1")):
        code, _, err = tb("synth", str(root / args[0]), *args[1:], "--no-progress")
        assert code == 0, err
    videos = root / "videos"
    videos.mkdir()
    for clip in sorted((root / "short" / "videos").glob("*.mp4"))[:5]:
        shutil.copy(clip, videos / clip.name)
    shutil.copy(root / "long" / "videos" / "long_000000.mp4", videos / "long_000000.mp4")
    return root


def ingest(library: Path, data: Path, *extra: str) -> tuple[int, dict[str, Any], str]:
    args = ["ingest", str(library / "videos"), "--data-dir", str(data), "--no-progress"]
    args += ["--checkpoint", str(library / "checkpoint"), "--json", *extra]
    code, out, err = tb(*args)
    return code, (json.loads(out) if out.strip() else {}), err


def rows(uri: str, collection: str) -> dict[str, dict[str, Any]]:
    from tb_reranker.index import VideoIndex

    index = VideoIndex(uri, collection=collection)
    try:
        keys = [str(row["id"]) for row in index.iter_rows(("id",))]
        assert len(keys) == len(set(keys)), "a key twice in Milvus"
        return index.get(keys, with_vectors=True)
    finally:
        index.close()


def test_bulk_ingest_matches_upserts(
    library: Path, milvus_server, milvus_server_uri: str, tmp_path: Path
) -> None:
    uri = milvus_server_uri
    staging = str(Path(milvus_server.base_dir) / "data" / "tb_bulk_cli")
    server = ("--uri", uri)
    code, upserted, err = ingest(library, tmp_path / "up", *server, "--collection", "cli_up")
    assert code == 0, err
    bulk_args = (*server, "--collection", "cli_bulk", "--bulk", "--bulk-staging", staging)
    code, bulk, err = ingest(library, tmp_path / "bulk", *bulk_args)
    assert code == 0, err
    assert bulk["ingested"] == upserted["ingested"] == 6
    assert bulk["segments"] == upserted["segments"] > 6  # the long file is several rows
    assert bulk["bulk_rows"] == bulk["segments"] and "bulk_rows" not in upserted

    a, b = rows(uri, "cli_up"), rows(uri, "cli_bulk")
    assert sorted(a) == sorted(b)
    for key, row in a.items():
        np.testing.assert_allclose(b[key]["cls"], row["cls"], atol=1e-4, err_msg=key)
        for field in ("video_id", "segment", "start_s", "end_s", "content_hash"):
            assert b[key][field] == row[field], (key, field)
    assert not any(Path(staging).glob("**/*.parquet")), "staged files left behind"

    code, again, err = ingest(library, tmp_path / "bulk", *bulk_args)
    assert code == 0, err
    assert again["unchanged"] == 6 and again["ingested"] == 0
    assert sorted(rows(uri, "cli_bulk")) == sorted(a)  # nothing duplicated


def test_bulk_refusals(library: Path, tmp_path: Path) -> None:
    code, _, err = ingest(library, tmp_path / "lite", "--bulk", "--bulk-staging", str(tmp_path))
    assert code == 2 and "Lite has no bulk import" in error_line(err), err
    assert "created collection" not in err, "wrote before refusing"

    code, _, err = ingest(library, tmp_path / "nostage", "--bulk")
    assert code == 2 and "--bulk-staging" in error_line(err), err
    code, _, err = ingest(library, tmp_path / "nobulk", "--bulk-staging", str(tmp_path))
    assert code == 2 and "--bulk-staging needs --bulk" in error_line(err), err


def error_line(err: str) -> str:
    """The CLI's one error line (log lines may precede it); no traceback."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("tb ingest: error:")]
    assert len(lines) == 1, err
    return lines[0]
