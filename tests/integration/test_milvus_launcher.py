"""The local Milvus launcher: free ports (even with the default ones taken), health, clean stop."""

from __future__ import annotations

import contextlib
import os
import socket

import pytest

pytestmark = pytest.mark.server


def test_launcher_uses_free_ports_and_stops(tmp_path) -> None:
    pytest.importorskip("milvus", reason="the `milvus` dev dependency is not installed")
    from pymilvus import MilvusClient

    from milvus_setup.launcher import LocalMilvus

    held = []
    for port in (19530, 2379, 2380, 9091):  # occupy Milvus's defaults where we can
        sock = socket.socket()
        with contextlib.suppress(OSError):
            sock.bind(("127.0.0.1", port))
            sock.listen()
            held.append(sock)
            continue
        sock.close()
    try:
        server = LocalMilvus()
        with server:
            assert server.running and server.port not in (19530, 2379, 2380, 9091)
            assert server.start_seconds is not None and server.start_seconds > 0
            client = MilvusClient(uri=server.uri)
            assert client.list_collections() == []
            client.close()
            pid = server._proc.pid  # type: ignore[union-attr]
            base_dir = server.base_dir
        assert not server.running
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
        assert not base_dir.exists()  # its temporary dir is removed
    finally:
        for sock in held:
            sock.close()


def test_server_dies_with_a_killed_launcher(tmp_path) -> None:
    """`python -m milvus_setup serve` SIGKILLed: the kernel stops its Milvus child too."""
    pytest.importorskip("milvus", reason="the `milvus` dev dependency is not installed")
    import json
    import signal
    import subprocess
    import sys
    import time

    base = tmp_path / "srv"
    proc = subprocess.Popen(
        [sys.executable, "-m", "milvus_setup", "serve", "--base-dir", str(base)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        assert json.loads(line)["uri"].startswith("http://127.0.0.1:")
        children = subprocess.run(
            ["pgrep", "-P", str(proc.pid)], capture_output=True, text=True
        ).stdout.split()
        assert len(children) == 1
        child = int(children[0])
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        os.kill(child, signal.SIGKILL)
        pytest.fail("the Milvus server outlived its killed launcher")
