"""Several sidecars behind one target: gRPC round robin spreads the SDK's calls over all of them.

gRPC balances over the addresses of one resolver result. Here two real sidecars listen on two
loopback ports and the target lists both (``ipv4:127.0.0.1:p1,127.0.0.1:p2``); a DNS name with
several A records (``dns:///rerankers.internal:50051``, a headless Service) is one resolver
result of the same kind, balanced the same way (this machine has no name resolving to two
addresses to test it with)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from tb_reranker.remote import AsyncRemoteReranker, RemoteReranker
from tb_reranker.server.config import ServerConfig
from tb_reranker.server.testing import ServerThread, build_tiny_components

CALLS = 40


def _served(running: ServerThread) -> int:
    """gRPC calls this sidecar answered, from its own Prometheus counters."""
    total = 0.0
    for metric in running.server.metrics.registry.collect():
        if metric.name == "tb_grpc_requests":
            total += sum(s.value for s in metric.samples if s.name == "tb_grpc_requests_total")
    return int(total)


@pytest.fixture(scope="module")
def two_sidecars(tmp_path_factory):
    """Two identical sidecars (same seed: same model and stored tokens), each on its own port."""
    servers = []
    try:
        for name in ("a", "b"):
            components, ids = build_tiny_components(tmp_path_factory.mktemp(name), num_videos=12)
            servers.append(ServerThread(ServerConfig(port=0), lambda c=components: c).start())
        yield servers, ids
    finally:
        for running in servers:
            running.stop()


def _target(servers: list[ServerThread]) -> str:
    return "ipv4:" + ",".join(f"127.0.0.1:{running.port}" for running in servers)


def test_sync_calls_reach_both_sidecars(two_sidecars):
    """Before: gRPC's default pick_first sent every call to the first address."""
    servers, ids = two_sidecars
    before = [_served(running) for running in servers]
    with RemoteReranker(_target(servers), timeout=30) as remote:
        indicators = remote.encode(["a red circle then a blue square"])
        first = remote.rerank(indicators, [ids[:8]])
        for _ in range(CALLS):
            again = remote.rerank(indicators, [ids[:8]])
            assert [c.id for c in again[0].candidates] == [c.id for c in first[0].candidates]
            np.testing.assert_allclose(
                [c.score for c in again[0].candidates],
                [c.score for c in first[0].candidates],
                rtol=1e-5,
                atol=1e-6,
            )
    served = [_served(running) - b for running, b in zip(servers, before, strict=True)]
    assert sum(served) == CALLS + 2, served
    assert min(served) >= CALLS // 4, served  # both took a fair share (round robin: ≈ half)


def test_async_calls_reach_both_sidecars(two_sidecars):
    servers, ids = two_sidecars
    before = [_served(running) for running in servers]

    async def run() -> None:
        remote = AsyncRemoteReranker(_target(servers), timeout=30)
        try:
            indicators = await remote.encode(["a dog"])
            for _ in range(CALLS):
                await remote.rerank(indicators, [ids[:5]])
        finally:
            await remote.close()

    asyncio.run(run())
    served = [_served(running) - b for running, b in zip(servers, before, strict=True)]
    assert sum(served) == CALLS + 1 and min(served) >= CALLS // 4, served


def test_a_stopped_sidecar_leaves_the_other_serving(tmp_path):
    """Round robin skips an address that does not answer: no call fails while one is up."""
    components, ids = build_tiny_components(tmp_path / "up", num_videos=6)
    with ServerThread(ServerConfig(port=0), lambda: components) as up:
        down = ServerThread(ServerConfig(port=0), lambda: components).start()
        target = f"ipv4:127.0.0.1:{down.port},127.0.0.1:{up.port}"
        down.stop()
        with RemoteReranker(target, timeout=30, retries=3) as remote:
            indicators = remote.encode(["a cat"])
            for _ in range(10):
                assert len(remote.rerank(indicators, [ids[:4]])[0].candidates) == 4
