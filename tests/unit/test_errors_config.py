"""The error hierarchy, its gRPC table, settings precedence, and the CLI's error contract."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tb_reranker import errors
from tb_reranker.config import Settings
from tb_reranker.wire import status


def test_every_error_maps_to_a_status_and_unknown_is_internal():
    for klass in status.GRPC_STATUS:
        assert issubclass(klass, errors.TBError)
    assert status.grpc_status_name(errors.InvalidInputError("x")) == "INVALID_ARGUMENT"
    assert status.grpc_status_name(errors.VideoDecodeError("a.mp4", "bad")) == "INVALID_ARGUMENT"
    assert status.grpc_status_name(errors.ResourceExhaustedError("busy")) == "RESOURCE_EXHAUSTED"
    assert status.grpc_status_name(RuntimeError("boom")) == "INTERNAL"
    # every status name the tables use is a real gRPC status; every HTTP answer is an error
    import grpc

    names = {*status.GRPC_STATUS.values(), *status.STATUS_ERRORS, *status.HTTP_STATUS}
    assert all(name in grpc.StatusCode.__members__ for name in names)
    assert all(400 <= code < 600 for code in status.HTTP_STATUS.values())
    assert status.named_error("InvalidInputError") is errors.InvalidInputError
    assert status.named_error("VideoDecodeError") is None  # (path, reason) constructor
    assert status.named_error("RuntimeError") is None


def test_retriable_defaults_and_override():
    assert errors.IndexBackendError("down").retriable
    assert not errors.InvalidInputError("bad").retriable
    assert errors.StoreError("x", retriable=True).retriable


def test_errors_are_also_builtin_kinds():
    with pytest.raises(ValueError):
        raise errors.InvalidInputError("bad")
    with pytest.raises(KeyError):
        raise errors.NotFoundError("missing")
    assert str(errors.NotFoundError("no such video")) == "no such video"
    exc = errors.VideoDecodeError("/x/clip.mp4", "truncated")
    assert "/x/clip.mp4" in str(exc) and exc.path == "/x/clip.mp4"


def test_settings_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("TB_COLLECTION", "from_env")
    monkeypatch.setenv("TB_TOP_K", "7")
    monkeypatch.setenv("TB_DATA_DIR", str(tmp_path))
    s = Settings.from_env()
    assert s.collection == "from_env" and s.top_k == 7
    assert s.milvus_uri == str(tmp_path / "milvus.db")
    assert s.store == str(tmp_path / "frames")
    s2 = Settings.from_env(collection="arg", milvus_uri="http://h:19530")
    assert s2.collection == "arg" and s2.milvus_uri == "http://h:19530"
    with pytest.raises(TypeError):
        Settings.from_env(nonsense=1)


def test_import_is_light():
    """Importing the package must not import torch, pymilvus or grpc (no work at import time)."""
    code = (
        "import sys, tb_reranker, tb_reranker.errors, tb_reranker.config, tb_reranker.cli;"
        "heavy = [m for m in ('torch', 'pymilvus', 'grpc') if m in sys.modules];"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_cli_user_error_is_one_line_and_exit_2(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tb_reranker",
            "search",
            "a red circle",
            "--data-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "no TokenBinder checkpoint" in lines[0]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train"], "--data (or TB_DATA) is required"),
        (["train", "--data", "d"], "--out (or TB_OUT) is required"),
        (["eval", "--data", "d"], "--checkpoint (or TB_CHECKPOINT) is required"),
        (["eval", "--checkpoint", "c"], "--data (or TB_DATA) is required"),
        (["ablate", "--out", "o"], "--data (or TB_DATA) is required"),
        (["ablate", "--data", "d"], "--out (or TB_OUT) is required"),
    ],
)
def test_cli_names_a_missing_required_option(argv, message, monkeypatch, capsys):
    from tb_reranker.cli import main

    for name in ("TB_DATA", "TB_OUT", "TB_CHECKPOINT"):
        monkeypatch.delenv(name, raising=False)
    assert main(argv) == 2
    assert capsys.readouterr().err.strip().endswith(f"error: {message}")
