"""``tb serve`` as a real process: flags and TB_* variables, readiness, SIGTERM drains and exits 0."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tb_reranker.model import save_checkpoint
from tb_reranker.remote import RemoteReranker
from tb_reranker.server.testing import build_tiny_components


def _wait_for(process: subprocess.Popen, pattern: str, lines: list[str], timeout: float = 120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        if not line:
            if process.poll() is not None:
                break
            continue
        lines.append(line)
        match = re.search(pattern, line)
        if match:
            return match
    raise AssertionError(f"{pattern!r} not seen; stderr:\n{''.join(lines)}")


def test_tb_serve_process(tmp_path):
    components, ids = build_tiny_components(tmp_path, num_videos=8)
    save_checkpoint(components.reranker.model, tmp_path / "checkpoint")
    components.reranker.store.close()
    env = dict(os.environ)
    env.update(
        {
            "TB_CHECKPOINT": str(tmp_path / "checkpoint"),
            "TB_STORE": str(tmp_path / "frames"),
            "TB_SERVE_TOKEN": "cli-token",
            "TB_SERVE_GRACE_S": "3",
        }
    )
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tb_reranker",
            "serve",
            "--port",
            "0",
            "--no-search",
            "--no-batching",
        ],
        env=env,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    lines: list[str] = []
    try:
        port = int(_wait_for(process, r"gRPC on 127\.0\.0\.1:(\d+)", lines).group(1))
        _wait_for(process, r"model ready", lines)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            status = health.Check(health_pb2.HealthCheckRequest(), timeout=10).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        with RemoteReranker(f"127.0.0.1:{port}", token="cli-token", timeout=30) as remote:
            info = remote.info()
            assert info["batching"] is False and info["model_fingerprint"]
            results = remote.rerank(remote.encode(["a dog"]), [ids[:5]])
            assert len(results[0].candidates) == 5
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
        lines.extend(process.stderr.readlines())
        assert any("draining" in line for line in lines)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)


def test_tb_serve_without_checkpoint_exits_2(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("TB_")}
    result = subprocess.run(
        [sys.executable, "-m", "tb_reranker", "serve", "--port", "0", "--no-search"],
        env=env | {"TB_DATA_DIR": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "tb serve: error: checkpoint directory" in result.stderr
