"""The provider HTTP port against slow, aborted and malformed clients, on real sockets (loopback).

``tb serve`` runs as a real process on a fresh ``--data-dir`` for the user's path (stalled
uploads beside real clients, SIGTERM, garbage requests); in-process servers beside it where a
test reads the server's log records or needs a long batch window.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tb_reranker._pb.tb_reranker.v1 import reranker_pb2 as pb
from tb_reranker._pb.tb_reranker.v1 import reranker_pb2_grpc as pb_grpc
from tb_reranker.remote import RemoteReranker
from tb_reranker.server.config import ServerConfig
from tb_reranker.server.testing import ServerThread, build_tiny_components

TOKEN = "transport-token"
STALLED_HEAD = (
    "POST /v1/rerank HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    "Content-Length: 1000\r\n{auth}\r\n"
)


# ---------------------------------------------------------------------- helpers
@pytest.fixture
def saved(tiny_served):
    """A checkpoint and a frame store on disk; returns (root, stored ids)."""
    return tiny_served


class Serve:
    """``tb serve`` as a child process (gRPC, provider HTTP), its stderr collected by a thread."""

    def __init__(self, root: Path, data_dir: Path, *args: str, env: dict | None = None) -> None:
        environment = {k: v for k, v in os.environ.items() if not k.startswith("TB_")}
        environment.update(env or {})
        command = [
            sys.executable,
            "-m",
            "tb_reranker",
            "serve",
            "--port",
            "0",
            "--http-port",
            "0",
            "--no-search",
            "--checkpoint",
            str(root / "checkpoint"),
            "--store",
            str(root / "frames"),
            "--data-dir",
            str(data_dir),
            *args,
        ]
        self.process = subprocess.Popen(
            command, env=environment, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.grpc_port = int(self.wait_for(r"gRPC on 127\.0\.0\.1:(\d+)").group(1))
        self.http_port = int(self.wait_for(r"provider HTTP endpoints on 127\.0\.0\.1:(\d+)")[1])
        self.wait_for(r"model ready")

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line)

    def wait_for(self, pattern: str, timeout: float = 120.0) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                match = re.search(pattern, line)
                if match:
                    return match
            if self.process.poll() is not None and not self._reader.is_alive():
                break
            time.sleep(0.05)
        raise AssertionError(f"{pattern!r} not seen; stderr:\n{''.join(self.lines)}")

    def stderr(self) -> str:
        self._reader.join(10)
        return "".join(self.lines)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self._reader.join(10)


def stalled_upload(port: int, token: str | None = None) -> socket.socket:
    """Headers, ``Content-Length: 1000``, 10 bytes of body, then nothing."""
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(STALLED_HEAD.format(auth=auth).encode() + b'{"query": ')
    return sock


def read_response(sock: socket.socket, timeout: float = 30.0) -> tuple[int | None, dict, bytes]:
    """(status, headers, body) of one HTTP response; status None when the server closed the
    connection without answering."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            return None, {}, data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        key, _, value = line.partition(":")
        headers[key.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        body += chunk
    return int(lines[0].split()[1]), headers, body


def post_json(port: int, path: str, body, token: str | None = None) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        data=json.dumps(body).encode(),
        headers=headers,
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def exchange(port: int, raw: bytes, timeout: float = 30.0) -> tuple[int | None, dict, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(raw)
        return read_response(sock, timeout)


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
        return response.read().decode()


# ---------------------------------------------------------------------- slow uploads
def test_stalled_uploads_hold_no_slot_and_end_with_408(saved, tmp_path):
    """64 uploads that stall mid-body (max_concurrency is 64) do not lock anyone out: a real
    client is served over HTTP and gRPC meanwhile, and each stalled upload gets 408 once
    ``http_body_timeout_s`` has passed. No token needed by the staller: none is configured."""
    root, ids = saved
    serve = Serve(root, tmp_path / "tb_data", env={"TB_SERVE_HTTP_BODY_TIMEOUT_S": "3"})
    sockets: list[socket.socket] = []
    try:
        sockets = [stalled_upload(serve.http_port) for _ in range(64)]
        time.sleep(0.5)  # every one of them is inside the server, waiting for its body
        status, body = post_json(
            serve.http_port, "/v2/rerank", {"query": "a dog", "documents": ids[:4]}
        )
        assert status == 200 and len(body["results"]) == 4, body
        with RemoteReranker(f"127.0.0.1:{serve.grpc_port}", timeout=30, retries=0) as remote:
            results = remote.rerank(remote.encode(["a dog"]), [ids[:4]])
            assert len(results[0].candidates) == 4
        for sock in sockets:
            status, headers, raw = read_response(sock)
            assert status == 408, (status, raw[:200])
            assert json.loads(raw)["error_type"] == "DEADLINE_EXCEEDED"
            assert headers.get("connection", "").lower() == "close"
        text = scrape(serve.http_port)
        assert 'tb_http_requests_total{route="/v1/rerank",status="408"} 64.0' in text
    finally:
        for sock in sockets:
            sock.close()
        serve.close()


def test_sigterm_with_stalled_uploads_honours_the_grace(saved, tmp_path):
    """Uploads that would stall for two minutes do not hold a shutdown past its grace."""
    root, _ = saved
    env = {"TB_SERVE_HTTP_BODY_TIMEOUT_S": "120", "TB_SERVE_GRACE_S": "1"}
    serve = Serve(root, tmp_path / "tb_data", env=env)
    sockets: list[socket.socket] = []
    try:
        sockets = [stalled_upload(serve.http_port) for _ in range(16)]
        time.sleep(0.5)
        serve.process.send_signal(signal.SIGTERM)
        # grace 1 s (plus the unwinding): far below the 60 s aiohttp would wait by itself
        assert serve.process.wait(timeout=20) == 0
        for sock in sockets:
            assert read_response(sock, timeout=10)[0] is None  # closed, not answered
        assert "draining" in serve.stderr()
    finally:
        for sock in sockets:
            sock.close()
        serve.close()


def test_bad_body_timeout_is_exit_2(saved, tmp_path):
    root, _ = saved
    for value in ("0", "-1", "nan"):
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "tb_reranker",
                "serve",
                "--port",
                "0",
                "--no-search",
                "--checkpoint",
                str(root / "checkpoint"),
                "--data-dir",
                str(tmp_path / "tb_data"),
                "--http-body-timeout-s",
                value,
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 2, (value, result.stderr)
        assert "--http-body-timeout-s" in result.stderr and "a number > 0" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
        assert "Traceback" not in result.stderr


# ---------------------------------------------------------------------- garbage, via the CLI
def _head(path: str = "/v1/rerank", extra: str = "", token: str | None = None) -> bytes:
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Connection: close\r\n{auth}{extra}\r\n"
    ).encode()


BODY = b'{"query": "a dog", "documents": ["vid-000"]}'
GARBAGE = {
    "negative Content-Length": _head(extra="Content-Length: -1\r\n") + BODY,
    "duplicate Content-Length": _head(extra=f"Content-Length: {len(BODY)}\r\n" * 2) + BODY,
    "two different Content-Lengths": _head(extra="Content-Length: 3\r\nContent-Length: 5\r\n")
    + BODY,
    "br body": _head(extra=f"Content-Encoding: br\r\nContent-Length: {len(BODY)}\r\n") + BODY,
    "zstd body": _head(extra=f"Content-Encoding: zstd\r\nContent-Length: {len(BODY)}\r\n") + BODY,
    "70 KB URL": _head(path="/" + "a" * 70_000),
    "gzip body that is not gzip": _head(
        extra=f"Content-Encoding: gzip\r\nContent-Length: {len(BODY)}\r\n", token=TOKEN
    )
    + BODY,
    "broken chunks": _head(extra="Transfer-Encoding: chunked\r\n", token=TOKEN)
    + b"zz\r\nabc\r\n0\r\n\r\n",
}


def test_garbage_requests_are_4xx_quiet_and_never_5xx(saved, tmp_path):
    """Each malformed request gets a 4xx; an aborted upload is counted 499, not 500; the server
    log carries no traceback and no ERROR line for any of them."""
    root, ids = saved
    serve = Serve(root, tmp_path / "tb_data", env={"TB_SERVE_TOKEN": TOKEN})
    try:
        for name, raw in GARBAGE.items():
            status, _, body = exchange(serve.http_port, raw)
            assert status is not None and 400 <= status < 500, (name, status, body[:200])
        for _ in range(3):  # uploads the client gives up on halfway
            sock = socket.create_connection(("127.0.0.1", serve.http_port), timeout=30)
            sock.sendall(_head(extra="Content-Length: 1000\r\n", token=TOKEN) + b'{"query": ')
            time.sleep(0.2)
            sock.close()
        status, _ = post_json(
            serve.http_port, "/v1/rerank", {"query": "a dog", "documents": ids[:3]}, TOKEN
        )
        assert status == 200  # still serving
        deadline = time.monotonic() + 30
        while 'status="499"} 3.0' not in (text := scrape(serve.http_port)):
            assert time.monotonic() < deadline, text
            time.sleep(0.2)
        assert not re.search(r'tb_http_requests_total\{[^}]*status="5\d\d"', text), text
        assert "tb_http_malformed_total" in text
        serve.process.send_signal(signal.SIGTERM)
        assert serve.process.wait(timeout=30) == 0
        log = serve.stderr()
        assert "Traceback" not in log, log
        assert " ERROR " not in log, log
    finally:
        serve.close()


# ---------------------------------------------------------------------- in-process servers
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_components(tmp_path_factory.mktemp("transport_tiny"), num_videos=8)


def test_auth_is_checked_before_the_body(tiny):
    """A stalled upload without the token is answered 401 at once, with the Bearer challenge,
    long before the body timeout, and never holds a slot."""
    components, _ = tiny
    config = ServerConfig(port=0, http_port=0, token=TOKEN, http_body_timeout_s=60)
    with ServerThread(config, lambda: components) as running:
        sock = stalled_upload(running.server.http_port)
        try:
            status, headers, body = read_response(sock, timeout=10)
        finally:
            sock.close()
        assert status == 401, body[:200]
        assert headers["www-authenticate"].startswith("Bearer ")
        assert json.loads(body)["error_type"] == "UNAUTHENTICATED"
        assert running.server.metrics.http_in_flight._value.get() == 0  # noqa: SLF001


def test_http_and_grpc_have_their_own_slots(tiny):
    """With every HTTP slot busy, gRPC is still served (and the other way round); each surface
    sheds only its own extra calls."""
    components, ids = tiny
    config = ServerConfig(port=0, http_port=0, max_concurrency=2, max_wait_ms=1500, max_batch=64)
    body = {"query": "a dog", "documents": ids[:3]}
    request = pb.RerankRequest(text="a dog", candidates_ids=ids[:3])
    with (
        ServerThread(config, lambda: components) as running,
        grpc.insecure_channel(running.target) as channel,
        concurrent.futures.ThreadPoolExecutor(4) as pool,
    ):
        port, stub = running.server.http_port, pb_grpc.RerankServiceStub(channel)
        # two HTTP requests wait in the 1.5 s batch window, holding both HTTP slots
        held = [pool.submit(post_json, port, "/v2/rerank", body) for _ in range(2)]
        time.sleep(0.5)
        call = stub.Rerank.future(request, timeout=30)  # joins the same window
        status, refused = post_json(port, "/v2/rerank", body)
        assert len(call.result().ranks) == 3  # gRPC served while HTTP is full
        assert status == 429 and refused["error_type"] == "RESOURCE_EXHAUSTED", refused
        assert [f.result()[0] for f in held] == [200, 200]
        # and the other way round
        calls = [stub.Rerank.future(request, timeout=30) for _ in range(2)]
        time.sleep(0.5)
        answer = pool.submit(post_json, port, "/v2/rerank", body)
        with pytest.raises(grpc.RpcError) as info:
            stub.Rerank(request, timeout=30)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert answer.result()[0] == 200
        assert [len(c.result().ranks) for c in calls] == [3, 3]


@pytest.fixture(scope="module")
def quick_server(tiny):
    """A token server whose bodies must arrive within a second."""
    components, _ = tiny
    config = ServerConfig(port=0, http_port=0, token=TOKEN, http_body_timeout_s=1.0)
    with ServerThread(config, lambda: components) as running:
        yield running


CONTENT_LENGTH = st.one_of(
    st.integers(-3, 200).map(str),
    st.sampled_from(["", "abc", "1e3", "0x10", "+5", "5 5", "99999999999999999999999"]),
)
HEAD_LINES = st.sampled_from(
    [
        "Content-Encoding: br",
        "Content-Encoding: zstd",
        "Content-Encoding: gzip",
        "Content-Encoding: deflate",
        "Content-Encoding: compress",
        "Content-Encoding: gzip, br",
        "Content-Encoding: x-unknown",
        "Transfer-Encoding: chunked",
        "Transfer-Encoding: gzip",
        "Transfer-Encoding: chunked, chunked",
        "Transfer-Encoding: xchunked",
        "Content-Type: text/plain",
        "X-Bad\x00: 1",
        "NoColon",
        " folded: x",
        "X-Del: \x7f",
        "Host: second",
        f"Authorization: Bearer {TOKEN}",
        "Authorization: Bearer wrong",
    ]
)


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    path=st.one_of(
        st.sampled_from(["/rerank", "/v1/rerank", "/v2/rerank", "/nope"]),
        st.integers(8_000, 70_000).map(lambda n: "/" + "a" * n),
    ),
    lengths=st.lists(CONTENT_LENGTH, max_size=3),
    lines=st.lists(HEAD_LINES, max_size=4),
    body=st.binary(max_size=48),
)
def test_malformed_request_heads_get_4xx_without_traceback(
    quick_server, caplog, path, lengths, lines, body
):
    """Any mix of bad framing, encodings and header lines: a 4xx, at most a debug line per
    request, no traceback, never a 5xx counted."""
    caplog.set_level(logging.DEBUG, logger="tb_reranker")
    caplog.set_level(logging.DEBUG, logger="aiohttp")
    extra = "".join(f"Content-Length: {n}\r\n" for n in lengths) + "".join(
        f"{line}\r\n" for line in lines
    )
    raw = _head(path=path, extra=extra) + body
    caplog.clear()
    status, _, reply = exchange(quick_server.server.http_port, raw, timeout=15)
    assert status is not None and 400 <= status < 500, (raw[:300], status, reply[:200])
    for record in caplog.records:
        assert not record.exc_info and "Traceback" not in record.getMessage(), record.getMessage()
        assert record.levelno < logging.WARNING, (record.name, record.getMessage()[:300])
    for metric in quick_server.server.metrics.http_requests.collect():
        for sample in metric.samples:
            assert not sample.labels.get("status", "").startswith("5"), sample
