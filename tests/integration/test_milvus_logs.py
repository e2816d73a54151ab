"""pymilvus's error logs: silent for the failures ``VideoIndex`` handles (a one-line typed error
is what the user sees), kept for everything else."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tb_reranker.errors import IndexBackendError, NotFoundError
from tb_reranker.index import VideoIndex


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def loud(self) -> list[str]:
        return [r.getMessage() for r in self.records if r.levelno >= logging.WARNING]


@pytest.fixture
def pymilvus_logs() -> Iterator[_Records]:
    """What reaches pymilvus's own handlers (its logger does not propagate to the root)."""
    import pymilvus  # noqa: F401 - its import configures its loggers, replacing their handlers

    handler = _Records()
    logger = logging.getLogger("pymilvus")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch

    from tb_reranker.model import TokenBinder, TokenBinderConfig, save_checkpoint

    root = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    save_checkpoint(TokenBinder(TokenBinderConfig.tiny()), root / "checkpoint")
    return root / "checkpoint"


def test_cli_search_of_a_missing_collection_is_one_line_without_traceback(checkpoint, tmp_path):
    """Before: pymilvus logged `[ERROR][_log_rpc_error]: RPC error: [describe_collection]` and
    a traceback above our one line."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TB_")}
    result = subprocess.run(
        [sys.executable, "-m", "tb_reranker", "search", "a red circle"]
        + ["--checkpoint", str(checkpoint), "--uri", str(tmp_path / "milvus.db")]
        + ["--store", str(tmp_path / "frames"), "--collection", "no_such_collection"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and "ERROR" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if "tb search: error:" in line]
    assert len(errors) == 1 and "'no_such_collection' does not exist" in errors[0]


def test_missing_collection_in_process(tmp_path, pymilvus_logs):
    index = VideoIndex(str(tmp_path / "m.db"), collection="absent", dim=4)
    with pytest.raises(NotFoundError):
        index.stored_fingerprint()
    with pytest.raises(NotFoundError):
        index.count()
    assert pymilvus_logs.loud() == []
    # outside VideoIndex's handled calls pymilvus logs as before
    with pytest.raises(Exception, match="does not exist"):
        index.client.describe_collection("absent")
    assert any("describe_collection" in line for line in pymilvus_logs.loud())
    index.close()


def test_an_unexpected_pymilvus_failure_still_logs_its_traceback(
    tmp_path, pymilvus_logs, monkeypatch
):
    from pymilvus.decorators import error_handler

    from tb_reranker.server.app import _NoPymilvusTraceback

    # the library's own behaviour: without the sidecar's filter (a TBServer started by another
    # test in this process installs it, and it trims every pymilvus traceback)
    logger = logging.getLogger("pymilvus.decorators")
    kept = [f for f in logger.filters if not isinstance(f, _NoPymilvusTraceback)]
    monkeypatch.setattr(logger, "filters", kept)

    @error_handler(func_name="buggy_call")
    def buggy_call(timeout: float | None = None) -> None:
        raise KeyError("a bug, not a Milvus answer")

    index = VideoIndex(str(tmp_path / "m.db"), collection="c", dim=4)
    with pytest.raises(IndexBackendError):  # still typed for the caller...
        index._call("buggy call", buggy_call)
    loud = pymilvus_logs.loud()  # ...and still logged with its traceback for whoever debugs it
    assert len(loud) == 1 and "buggy_call" in loud[0] and "Traceback" in loud[0], loud
    index.close()


@pytest.mark.server
def test_a_stopped_server_is_a_typed_error_without_pymilvus_tracebacks(tmp_path, pymilvus_logs):
    """Before: an ERROR `RPC error: [query]` and a WARNING `Connection recovery failed`, both
    with tracebacks, for a failure that ends as IndexBackendError (retriable)."""
    pytest.importorskip("milvus", reason="the `milvus` dev dependency is not installed")
    from milvus_setup.launcher import LocalMilvus

    with LocalMilvus(tmp_path / "srv") as server:
        index = VideoIndex(server.uri, collection="c1", dim=4, fingerprint="fp", timeout=5)
        index.create()
        assert index.count() == 0
    with pytest.raises(IndexBackendError) as info:
        index.count()
    assert info.value.retriable
    assert pymilvus_logs.loud() == []
    index.close()
