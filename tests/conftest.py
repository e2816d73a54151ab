"""Session-wide test settings."""

from __future__ import annotations

import logging
import os

import pytest


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tiny models run faster on one thread, and the 2-core machine also hosts Milvus and moto."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        import torch
    except ImportError:  # pragma: no cover
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def _root_log_handlers():
    """Puts the root logger's own handlers back after each test. ``tb``'s ``main`` run in-process
    replaces them with one on the ``sys.stderr`` of that moment: under ``capsys`` a stream closed
    after the test, so a later test's log record (a server or Milvus Lite thread's) printed a
    ``--- Logging error ---`` traceback, on whichever test ran next (the order differs under
    pytest-xdist). pytest's own capture handlers of the running phase stay as they are."""
    from _pytest.logging import LogCaptureHandler

    root = logging.getLogger()
    before = [h for h in root.handlers if not isinstance(h, LogCaptureHandler)]
    yield
    capturing = [h for h in root.handlers if isinstance(h, LogCaptureHandler)]
    root.handlers[:] = before + capturing


@pytest.fixture
def tb_exit_code():
    """``tb ARGV``'s exit status from ``cli.main``: its return value, or the status of the
    ``SystemExit`` argparse raises for a flag it refuses itself (a bad number is refused there,
    at the edge, since every numeric flag has a bounded type)."""
    from tb_reranker.cli import main

    def run(argv: list[str]) -> int:
        try:
            return main(argv)
        except SystemExit as exc:
            return exc.code

    return run


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real local S3 endpoint for the session: moto's threaded server on a loopback port
    (skipped where ``moto[server]`` is not installed)."""
    import socket

    server_module = pytest.importorskip("moto.server", reason="moto[server] is not installed")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_env(monkeypatch: pytest.MonkeyPatch, s3_endpoint: str) -> str:
    """``s3_endpoint`` as ``TB_S3_ENDPOINT``, with throwaway AWS credentials, for this test."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("TB_S3_ENDPOINT", s3_endpoint)
    return s3_endpoint
