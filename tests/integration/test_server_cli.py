"""``tb serve`` as a real process: flags and TB_* variables, readiness, SIGTERM drains and exits 0."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tb_reranker._pb.tb_reranker.v1 import reranker_pb2 as pb
from tb_reranker._pb.tb_reranker.v1 import reranker_pb2_grpc as pb_grpc
from tb_reranker.remote import RemoteReranker


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


def test_tb_serve_process(tiny_served):
    root, ids = tiny_served
    env = dict(os.environ)
    env.update(
        {
            "TB_CHECKPOINT": str(root / "checkpoint"),
            "TB_STORE": str(root / "frames"),
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


# ---------------------------------------------------------------------- hostile configuration


@pytest.fixture
def saved(tiny_served):
    """A checkpoint and a frame store on disk, and an environment that points ``tb`` at them."""
    root, _ = tiny_served
    env = {k: v for k, v in os.environ.items() if not k.startswith("TB_")}
    env.update(
        {
            "TB_CHECKPOINT": str(root / "checkpoint"),
            "TB_STORE": str(root / "frames"),
            "TB_SERVE_GRACE_S": "1",
        }
    )
    return root, env


def _serve(env, *args, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", "tb_reranker", "serve", "--port", "0", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.parametrize("content", ["", "\n", "   \n\t\n", "\ntoken-on-line-2\nand-line-3\n"])
def test_blank_or_ambiguous_token_file_is_a_startup_error(saved, tmp_path, content):
    """Before: a blank first line turned auth off and the server came up open."""
    root, env = saved
    token_file = tmp_path / "token"
    token_file.write_text(content)
    result = _serve(env, "--no-search", "--token-file", str(token_file), timeout=60)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "token" in lines[0], result.stderr


def test_blank_token_variable_is_a_startup_error(saved):
    root, env = saved
    result = _serve(env | {"TB_SERVE_TOKEN": "   "}, "--no-search", timeout=60)
    assert result.returncode == 2 and "blank" in result.stderr, result.stderr


def test_port_in_use_is_one_line_and_exit_2(saved):
    root, env = saved
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        for flags in (["--port", str(port)], ["--http-port", str(port)]):
            result = subprocess.run(
                [sys.executable, "-m", "tb_reranker", "serve", "--no-search", *flags],
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert result.returncode == 2, result.stderr
            lines = [line for line in result.stderr.splitlines() if line.strip()]
            assert len(lines) == 1 and str(port) in lines[0], result.stderr
            assert "unexpected" not in result.stderr and "Traceback" not in result.stderr


def test_missing_milvus_lite_database_is_not_created_and_search_not_serving(saved, tmp_path):
    """Before: the sidecar created an empty database (and its directory) and said SERVING."""
    root, env = saved
    missing = tmp_path / "no" / "such" / "dir" / "milvus.db"
    process = subprocess.Popen(
        [sys.executable, "-m", "tb_reranker", "serve", "--port", "0"],
        env=env | {"TB_MILVUS_URI": str(missing)},
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    lines: list[str] = []
    try:
        port = int(_wait_for(process, r"gRPC on 127\.0\.0\.1:(\d+)", lines).group(1))
        _wait_for(process, r"Search stays NOT_SERVING", lines)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            request = health_pb2.HealthCheckRequest(service="tb_reranker.v1.SearchService")
            assert health.Check(request, timeout=10).status == 2  # NOT_SERVING
            overall = health.Check(health_pb2.HealthCheckRequest(), timeout=10).status
            assert overall == health_pb2.HealthCheckResponse.SERVING  # Encode/Rerank serve
            with pytest.raises(grpc.RpcError) as info:
                pb_grpc.SearchServiceStub(channel).Search(pb.SearchRequest(text="a"), timeout=30)
            assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "does not exist" in info.value.details()
            assert str(tmp_path) not in info.value.details()  # no server paths to the caller
        assert not missing.exists() and not missing.parent.exists()
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)


def test_unreachable_milvus_server_is_not_serving(saved):
    root, env = saved
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    process = subprocess.Popen(
        [sys.executable, "-m", "tb_reranker", "serve", "--port", "0"],
        env=env | {"TB_MILVUS_URI": dead},
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    lines: list[str] = []
    try:
        port = int(_wait_for(process, r"gRPC on 127\.0\.0\.1:(\d+)", lines).group(1))
        _wait_for(process, r"Milvus not reachable", lines)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            request = health_pb2.HealthCheckRequest(service="tb_reranker.v1.SearchService")
            assert health.Check(request, timeout=10).status == 2
            with pytest.raises(grpc.RpcError) as info:
                pb_grpc.SearchServiceStub(channel).Search(pb.SearchRequest(text="a"), timeout=30)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        process.kill()
        process.wait(10)


@pytest.mark.parametrize("flag", ["--uri", "--milvus-uri"])
def test_milvus_uri_flag_and_its_deprecated_alias(saved, tmp_path, flag):
    """``tb serve --uri`` like every other command; ``--milvus-uri`` still works, with a warning."""
    root, env = saved
    missing = tmp_path / "given-by-flag" / "milvus.db"
    process = subprocess.Popen(
        [sys.executable, "-m", "tb_reranker", "serve", "--port", "0", flag, str(missing)],
        env=env,  # no TB_MILVUS_URI: the flag is the only place the path comes from
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    lines: list[str] = []
    try:
        _wait_for(process, r"Search stays NOT_SERVING", lines)
        assert str(missing) in lines[-1]  # the flag's database is the one it looked for
        deprecations = [line for line in lines if "deprecated" in line]
        if flag == "--milvus-uri":
            assert len(deprecations) == 1 and "use --uri" in deprecations[0], lines
        else:
            assert not deprecations, lines
    finally:
        process.kill()
        process.wait(10)


def test_uri_and_deprecated_alias_disagreeing_is_a_user_error(saved, tmp_path):
    root, env = saved
    result = _serve(env, "--uri", str(tmp_path / "a.db"), "--milvus-uri", str(tmp_path / "b.db"))
    assert result.returncode == 2, result.stderr
    assert "give --uri or --milvus-uri (deprecated), not both" in result.stderr
