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


class _HandsOutATakenPort:
    """``free_port`` for the launcher that returns ``taken`` (a port the test holds) on its
    ``at``-th call: the race where a port picked as free is grabbed by someone else."""

    def __init__(self, taken: int, at: int):
        from milvus_setup import launcher

        self.taken, self.at, self.calls, self.real = taken, at, 0, launcher.free_port

    def __call__(self) -> int:
        self.calls += 1
        return self.taken if self.calls == self.at else self.real()


@pytest.fixture
def held_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def _milvus_port_keys() -> list[str]:
    from milvus import MilvusServerConfig

    config = MilvusServerConfig(data_dir="unused")
    return [key for key in config.configurable_items if key.endswith("_port")]


@pytest.mark.parametrize(
    "which",
    [
        "first milvus port",  # the milvus package's own check refuses it: "... bind failed"
        "etcd peer port",  # Milvus itself fails to bind it and exits
        "metrics port",  # Milvus logs the bind failure and runs on, never healthy
    ],
)
def test_a_taken_port_is_retried_with_new_ports(monkeypatch, caplog, held_port, which) -> None:
    """Before: `RuntimeError: set data_node_port=42057, but bind failed` ended the launch (and a
    taken etcd/metrics port ended it with an exit status or a 120 s timeout)."""
    pytest.importorskip("milvus", reason="the `milvus` dev dependency is not installed")
    from pymilvus import MilvusClient

    from milvus_setup import launcher

    n = len(_milvus_port_keys())  # the launcher picks these, then the etcd peer, then metrics
    at = {"first milvus port": 1, "etcd peer port": n + 1, "metrics port": n + 2}[which]
    picker = _HandsOutATakenPort(held_port, at)
    monkeypatch.setattr(launcher, "free_port", picker)
    caplog.set_level("WARNING", logger="milvus_setup.launcher")
    with launcher.LocalMilvus(start_timeout=100) as server:
        assert server.running and held_port not in (server.port, server.metrics_port)
        client = MilvusClient(uri=server.uri)
        assert client.list_collections() == []
        client.close()
    assert picker.calls > at  # a second set of ports was picked
    retries = [r.getMessage() for r in caplog.records if "retrying with new ports" in r.message]
    # The held port fails the first attempt. Under xdist another worker's server can take a port
    # this launch picked and released a moment before, which costs a further retry of its own:
    # those are allowed, but never for the held port (it is handed out once), and never all 5.
    assert retries and "attempt 1/5" in retries[0], retries
    assert len(retries) < 5 and not any(f":{held_port}" in r for r in retries[1:]), retries
    assert which != "etcd peer port" or f":{held_port}" in retries[0]


def test_a_port_taken_in_every_attempt_is_one_clear_error(monkeypatch, held_port) -> None:
    pytest.importorskip("milvus", reason="the `milvus` dev dependency is not installed")
    from milvus_setup import launcher

    monkeypatch.setattr(launcher, "free_port", lambda: held_port)
    server = launcher.LocalMilvus(launch_attempts=3)
    with pytest.raises(launcher.MilvusLaunchError, match="a port was taken in each of 3 attempts"):
        server.start()
    assert not server.running and not server.base_dir.exists()
