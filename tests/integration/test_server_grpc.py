"""The gRPC sidecar on a real socket with a real tiny TokenBinder, LMDB store and Reranker."""

from __future__ import annotations

import concurrent.futures
import datetime
import math
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from tb_reranker._pb.tb_reranker.v1 import reranker_pb2 as pb
from tb_reranker._pb.tb_reranker.v1 import reranker_pb2_grpc as pb_grpc
from tb_reranker.server.config import ServerConfig
from tb_reranker.server.testing import ServerThread, build_tiny_components
from tb_reranker.wire.convert import tensor_from_proto, tensor_to_proto

SERVICES = [
    "tb_reranker.v1.EncodeService",
    "tb_reranker.v1.RerankService",
    "tb_reranker.v1.SearchService",
    "tb_reranker.v1.InfoService",
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    components, videos_ids = build_tiny_components(tmp_path_factory.mktemp("tiny"), num_videos=24)
    return components, videos_ids


@pytest.fixture(scope="module")
def server(tiny):
    components, _ = tiny
    config = ServerConfig(port=0, metrics_port=0, max_candidates=16, max_texts=4)
    with ServerThread(config, lambda: components) as running:
        yield running


@pytest.fixture
def channel(server):
    with grpc.insecure_channel(server.target) as ch:
        yield ch


def _code(call, *args, **kwargs) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call(*args, **kwargs)
    return info.value.code(), info.value.details()


def test_every_rpc(server, channel, tiny):
    components, ids = tiny
    reranker = components.reranker
    encode = pb_grpc.EncodeServiceStub(channel)
    rerank = pb_grpc.RerankServiceStub(channel)
    info = pb_grpc.InfoServiceStub(channel)
    search = pb_grpc.SearchServiceStub(channel)

    response = encode.Encode(pb.EncodeRequest(texts=["a dog runs", "a red car"]), timeout=30)
    indicators = tensor_from_proto(response.indicators)
    assert indicators.shape == (2, 4, 64)
    np.testing.assert_allclose(indicators, reranker.encode(["a dog runs", "a red car"]), atol=1e-5)
    assert response.model_fingerprint == reranker.model.fingerprint()
    assert response.metadata.batch_size >= 1 and response.metadata.total_ns > 0

    # indicators given, broad scores given: equals the in-process result exactly
    candidates = ids[:12]
    broad = list(np.linspace(0.9, 0.1, len(candidates)))
    reply = rerank.Rerank(
        pb.RerankRequest(
            indicators=tensor_to_proto(indicators[0]), candidates_ids=candidates, broad_scores=broad
        ),
        timeout=30,
    )
    expected = reranker.rerank(indicators[:1], [candidates], [broad])[0]
    assert [r.id for r in reply.ranks] == [c.id for c in expected.candidates]
    assert [r.score for r in reply.ranks] == [c.score for c in expected.candidates]
    assert [r.index for r in reply.ranks] == [c.index for c in expected.candidates]
    assert sum(r.reranked for r in reply.ranks) == 10  # K = 10, the other 2 keep broad order
    scores = [r.score for r in reply.ranks[:10]]
    assert scores == sorted(scores, reverse=True)
    assert all(r.HasField("best_frame_s") for r in reply.ranks[:10])
    assert reply.metadata.fusion_ns > 0 and reply.metadata.fetch_ns > 0

    # text query, broad scores computed from the store, top_n, unknown id reported per candidate
    reply = rerank.Rerank(
        pb.RerankRequest(text="a dog runs", candidates_ids=[*ids[:5], "ghost-1"], top_n=3),
        timeout=30,
    )
    assert len(reply.ranks) == 3
    assert [(m.id, m.index, m.reason) for m in reply.missing] == [
        ("ghost-1", 5, pb.MISSING_REASON_NOT_IN_STORE)
    ]
    assert reply.metadata.encode_ns > 0

    # strict: the same unknown id fails the call
    code, details = _code(
        rerank.Rerank,
        pb.RerankRequest(text="a dog", candidates_ids=[ids[0], "ghost-1"], strict=True),
        timeout=30,
    )
    assert code == grpc.StatusCode.NOT_FOUND and "ghost-1" in details

    rerank.Invalidate(pb.InvalidateRequest(videos_ids=ids[:2]), timeout=30)
    rerank.Invalidate(pb.InvalidateRequest(all=True), timeout=30)
    about = info.Info(pb.InfoRequest(), timeout=30)
    assert about.cache.size == 0  # invalidated
    assert (about.embed_dim, about.num_indicators, about.top_k, about.num_frames) == (64, 4, 10, 8)
    assert about.limits.max_candidates == 16 and about.api_version == "tb_reranker.v1"
    assert about.model_fingerprint == reranker.model.fingerprint()
    assert about.vision_fingerprint == reranker.model.vision_fingerprint()
    assert about.query_fingerprint == reranker.model.query_fingerprint()
    assert about.device == "cpu" and not about.search_enabled

    code, details = _code(search.Search, pb.SearchRequest(text="a dog", limit=5), timeout=30)
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "Milvus" in details


def test_cache_hit_rate_and_metrics(server, channel, tiny):
    _, ids = tiny
    rerank = pb_grpc.RerankServiceStub(channel)
    info = pb_grpc.InfoServiceStub(channel)
    rerank.Invalidate(pb.InvalidateRequest(all=True), timeout=30)
    before = info.Info(pb.InfoRequest(), timeout=30).cache
    for _ in range(3):
        rerank.Rerank(pb.RerankRequest(text="a cat", candidates_ids=ids[:8]), timeout=30)
    after = info.Info(pb.InfoRequest(), timeout=30).cache
    assert after.misses - before.misses == 8  # first call loads, the next two hit
    assert after.hits - before.hits == 16
    assert 0 < after.hit_rate <= 1

    with pytest.raises(grpc.RpcError):
        rerank.Rerank(pb.RerankRequest(text="a cat"), timeout=30)  # no candidates
    url = f"http://127.0.0.1:{server.server.metrics_port}/metrics"
    deadline = time.monotonic() + 5  # the server counts a call just after replying
    while True:
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        if 'code="INVALID_ARGUMENT"' in text or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert 'tb_grpc_requests_total{code="OK",method="RerankService/Rerank"}' in text
    assert 'tb_grpc_requests_total{code="INVALID_ARGUMENT",method="RerankService/Rerank"}' in text
    assert "tb_grpc_request_seconds_bucket" in text
    assert "tb_batch_size_bucket" in text
    assert "tb_kv_cache_hit_ratio" in text


def test_bad_inputs_get_invalid_argument(server, channel, tiny):
    _, ids = tiny
    rerank = pb_grpc.RerankServiceStub(channel)
    encode = pb_grpc.EncodeServiceStub(channel)
    cases = {
        "empty query text": pb.RerankRequest(text="  ", candidates_ids=ids[:3]),
        "no query": pb.RerankRequest(candidates_ids=ids[:3]),
        "no candidates": pb.RerankRequest(text="a dog"),
        "too many candidates": pb.RerankRequest(
            text="a dog", candidates_ids=[f"v{n}" for n in range(17)]
        ),
        "duplicate ids": pb.RerankRequest(text="a dog", candidates_ids=[ids[0], ids[1], ids[0]]),
        "NaN scores": pb.RerankRequest(
            text="a dog", candidates_ids=ids[:2], broad_scores=[0.5, math.nan]
        ),
        "score count": pb.RerankRequest(text="a dog", candidates_ids=ids[:2], broad_scores=[0.5]),
        "indicator dims": pb.RerankRequest(
            indicators=tensor_to_proto(np.ones((4, 32), np.float32)), candidates_ids=ids[:2]
        ),
        "indicator bytes": pb.RerankRequest(
            indicators=pb.FloatTensor(shape=[4, 64], data=b"\0" * 12), candidates_ids=ids[:2]
        ),
        "NaN indicators": pb.RerankRequest(
            indicators=tensor_to_proto(np.full((4, 64), np.nan, np.float32)),
            candidates_ids=ids[:2],
        ),
    }
    for name, request in cases.items():
        code, details = _code(rerank.Rerank, request, timeout=30)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (name, details)
    code, details = _code(
        rerank.Rerank, pb.RerankRequest(text="a dog", candidates_ids=[f"v{n}" for n in range(17)])
    )
    assert "max_candidates=16" in details
    code, details = _code(encode.Encode, pb.EncodeRequest(texts=["a"] * 5), timeout=30)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "max_texts=4" in details
    code, details = _code(encode.Encode, pb.EncodeRequest(texts=["x" * 3000]), timeout=30)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "max_text_chars" in details
    code, _ = _code(encode.Encode, pb.EncodeRequest(texts=[]), timeout=30)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    # the server keeps serving after all of these
    assert rerank.Rerank(pb.RerankRequest(text="a dog", candidates_ids=ids[:3]), timeout=30).ranks


def test_oversized_message_and_expired_deadline(tiny):
    components, ids = tiny
    config = ServerConfig(port=0, max_message_bytes=4096)
    with (
        ServerThread(config, lambda: components) as running,
        grpc.insecure_channel(running.target) as ch,
    ):
        rerank = pb_grpc.RerankServiceStub(ch)
        big = pb.RerankRequest(
            text="a dog " * 200, candidates_ids=[f"video-{n:06d}" for n in range(400)]
        )
        code, _ = _code(rerank.Rerank, big, timeout=30)
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        code, _ = _code(
            rerank.Rerank, pb.RerankRequest(text="a dog", candidates_ids=ids[:3]), timeout=1e-6
        )
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert rerank.Rerank(pb.RerankRequest(text="a dog", candidates_ids=ids[:3]), timeout=30)


def test_deadline_expires_inside_a_batch(tiny):
    """A call whose deadline passes while it waits for its batch gets DEADLINE_EXCEEDED."""
    components, ids = tiny
    config = ServerConfig(port=0, max_wait_ms=800, max_batch=64)
    with (
        ServerThread(config, lambda: components) as running,
        grpc.insecure_channel(running.target) as ch,
    ):
        rerank = pb_grpc.RerankServiceStub(ch)
        started = time.monotonic()
        code, _ = _code(
            rerank.Rerank, pb.RerankRequest(text="a dog", candidates_ids=ids[:3]), timeout=0.2
        )
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - started < 0.7


def test_health_transitions_and_reflection(tiny):
    components, _ = tiny
    release = threading.Event()

    def slow_load():
        release.wait(30)
        return components

    config = ServerConfig(port=0)
    running = ServerThread(config, slow_load, wait_ready=False).start()
    try:
        with grpc.insecure_channel(running.target) as ch:
            health = health_pb2_grpc.HealthStub(ch)

            def status(service: str) -> int:
                return health.Check(
                    health_pb2.HealthCheckRequest(service=service), timeout=10
                ).status

            for service in ["", *SERVICES]:
                assert status(service) == health_pb2.HealthCheckResponse.NOT_SERVING
            code, details = _code(
                pb_grpc.EncodeServiceStub(ch).Encode, pb.EncodeRequest(texts=["x"]), timeout=10
            )
            assert code == grpc.StatusCode.UNAVAILABLE and "loading" in details
            release.set()
            running.run(running.server.wait_ready(30))
            for service in ["", *SERVICES[:2], SERVICES[3]]:
                assert status(service) == health_pb2.HealthCheckResponse.SERVING
            # no Milvus: Search stays NOT_SERVING while Encode/Rerank serve
            assert status(SERVICES[2]) == health_pb2.HealthCheckResponse.NOT_SERVING

            database = ProtoReflectionDescriptorDatabase(ch)
            listed = set(database.get_services())
            assert set(SERVICES) <= listed
            assert {"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= listed
            descriptor = database.FindFileContainingSymbol("tb_reranker.v1.RerankService")
            assert descriptor.name == "tb_reranker/v1/reranker.proto"
    finally:
        running.stop()


REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"
REFLECTION_V1ALPHA = "grpc.reflection.v1alpha.ServerReflection"


def _reflect(channel, service: str, requests: list) -> list:
    """One reflection stream on ``service``. The v1 and v1alpha protocols have the same messages
    field for field (only the proto package differs), so v1alpha's classes speak both."""
    call = channel.stream_stream(
        f"/{service}/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    return list(call(iter(requests), timeout=10))


@pytest.mark.parametrize("service", [REFLECTION_V1, REFLECTION_V1ALPHA])
def test_reflection_v1_and_v1alpha(channel, service):
    """grpcurl and recent tools ask grpc.reflection.v1 first; older ones v1alpha: both answer."""
    from google.protobuf import descriptor_pb2

    list_services = reflection_pb2.ServerReflectionRequest(list_services="")
    by_symbol = reflection_pb2.ServerReflectionRequest(
        file_containing_symbol="tb_reranker.v1.RerankService"
    )
    listed, found = _reflect(channel, service, [list_services, by_symbol])
    names = {entry.name for entry in listed.list_services_response.service}
    assert {*SERVICES, "grpc.health.v1.Health", REFLECTION_V1, REFLECTION_V1ALPHA} <= names
    proto = descriptor_pb2.FileDescriptorProto.FromString(
        found.file_descriptor_response.file_descriptor_proto[0]
    )
    assert proto.name == "tb_reranker/v1/reranker.proto"
    assert "RerankService" in {s.name for s in proto.service}


def test_auth(tiny):
    components, ids = tiny
    config = ServerConfig(port=0, token="s3cret-token")
    with (
        ServerThread(config, lambda: components) as running,
        grpc.insecure_channel(running.target) as ch,
    ):
        rerank = pb_grpc.RerankServiceStub(ch)
        request = pb.RerankRequest(text="a dog", candidates_ids=ids[:3])
        code, _ = _code(rerank.Rerank, request, timeout=10)
        assert code == grpc.StatusCode.UNAUTHENTICATED
        code, _ = _code(
            rerank.Rerank, request, timeout=10, metadata=[("authorization", "Bearer wrong")]
        )
        assert code == grpc.StatusCode.UNAUTHENTICATED
        reply = rerank.Rerank(
            request, timeout=10, metadata=[("authorization", "Bearer s3cret-token")]
        )
        assert len(reply.ranks) == 3
        # health stays open for probes; reflection needs the token
        health = health_pb2_grpc.HealthStub(ch)
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == 1
        with pytest.raises(grpc.RpcError) as info:
            list(ProtoReflectionDescriptorDatabase(ch).get_services())
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as info:
            _reflect(ch, REFLECTION_V1, [reflection_pb2.ServerReflectionRequest(list_services="")])
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


def _certificates(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def make(name, issuer_cert=None, issuer_key=None, *, ca=False, san=None):
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer_cert.subject if issuer_cert else subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if san:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.DNSName(san)]), critical=False
            )
        cert = builder.sign(issuer_key or key, hashes.SHA256())
        return cert, key

    ca_cert, ca_key = make("tb test CA", ca=True)
    server_cert, server_key = make("localhost", ca_cert, ca_key, san="localhost")
    client_cert, client_key = make("tb client", ca_cert, ca_key)
    paths = {}
    for name, obj in {
        "ca.pem": ca_cert,
        "server.pem": server_cert,
        "client.pem": client_cert,
    }.items():
        (tmp_path / name).write_bytes(obj.public_bytes(serialization.Encoding.PEM))
        paths[name] = str(tmp_path / name)
    for name, key in {"server.key": server_key, "client.key": client_key}.items():
        (tmp_path / name).write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        paths[name] = str(tmp_path / name)
    return paths


def test_tls_and_mtls(tiny, tmp_path):
    components, ids = tiny
    paths = _certificates(tmp_path)
    ca = Path(paths["ca.pem"]).read_bytes()
    options = [("grpc.ssl_target_name_override", "localhost")]
    request = pb.RerankRequest(text="a dog", candidates_ids=ids[:3])

    config = ServerConfig(port=0, tls_cert=paths["server.pem"], tls_key=paths["server.key"])
    with ServerThread(config, lambda: components) as running:
        credentials = grpc.ssl_channel_credentials(root_certificates=ca)
        with grpc.secure_channel(running.target, credentials, options=options) as ch:
            assert len(pb_grpc.RerankServiceStub(ch).Rerank(request, timeout=10).ranks) == 3
        with grpc.insecure_channel(running.target) as ch:  # plaintext client: refused
            code, _ = _code(pb_grpc.RerankServiceStub(ch).Rerank, request, timeout=5)
            assert code == grpc.StatusCode.UNAVAILABLE

    config = ServerConfig(
        port=0,
        tls_cert=paths["server.pem"],
        tls_key=paths["server.key"],
        tls_client_ca=paths["ca.pem"],
    )
    with ServerThread(config, lambda: components) as running:
        anonymous = grpc.ssl_channel_credentials(root_certificates=ca)
        with grpc.secure_channel(running.target, anonymous, options=options) as ch:
            code, _ = _code(pb_grpc.RerankServiceStub(ch).Rerank, request, timeout=5)
            assert code == grpc.StatusCode.UNAVAILABLE
        mutual = grpc.ssl_channel_credentials(
            root_certificates=ca,
            private_key=Path(paths["client.key"]).read_bytes(),
            certificate_chain=Path(paths["client.pem"]).read_bytes(),
        )
        with grpc.secure_channel(running.target, mutual, options=options) as ch:
            assert len(pb_grpc.RerankServiceStub(ch).Rerank(request, timeout=10).ranks) == 3


def test_concurrency_below_and_above_the_limit(tiny):
    components, ids = tiny
    # below the limit: 24 concurrent clients, 6 calls each, zero errors, bounded time
    config = ServerConfig(port=0, max_concurrency=32, max_batch=16, max_wait_ms=2)
    with ServerThread(config, lambda: components) as running:

        def client(n: int) -> int:
            with grpc.insecure_channel(running.target) as ch:
                stub = pb_grpc.RerankServiceStub(ch)
                for k in range(6):
                    subset = [ids[(n + j + k) % len(ids)] for j in range(10)]
                    reply = stub.Rerank(
                        pb.RerankRequest(text=f"query {n}", candidates_ids=subset), timeout=60
                    )
                    assert len(reply.ranks) == 10
            return 6

        started = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(24) as pool:
            done = sum(pool.map(client, range(24)))
        assert done == 144 and time.monotonic() - started < 60
        batches = running.server.metrics.batch_size.labels("rerank")._sum.get()  # noqa: SLF001
        assert batches == 144  # every call ran in some batch

    # above the limit: calls held in a long batch window fill the 2 slots; the rest are shed
    config = ServerConfig(port=0, max_concurrency=2, max_batch=64, max_wait_ms=1000)
    with (
        ServerThread(config, lambda: components) as running,
        grpc.insecure_channel(running.target) as ch,
    ):
        stub = pb_grpc.RerankServiceStub(ch)
        futures = [
            stub.Rerank.future(pb.RerankRequest(text="q", candidates_ids=ids[:4]), timeout=30)
            for _ in range(8)
        ]
        codes = []
        for future in futures:
            try:
                future.result()
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as exc:
                codes.append(exc.code())
                if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    assert "max_concurrency=2" in exc.details()
        assert codes.count(grpc.StatusCode.OK) == 2
        assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 6
        # once drained, the server takes calls again
        assert stub.Rerank(pb.RerankRequest(text="q", candidates_ids=ids[:4]), timeout=30).ranks


def test_corrupt_store_entry_is_unavailable_and_server_keeps_serving(tmp_path):
    components, ids = build_tiny_components(tmp_path, num_videos=6)
    store = components.reranker.store
    store._write(lambda txn: txn.put(b"vid-005", b"not a frame record"))  # noqa: SLF001
    with (
        ServerThread(ServerConfig(port=0), lambda: components) as running,
        grpc.insecure_channel(running.target) as ch,
    ):
        rerank = pb_grpc.RerankServiceStub(ch)
        code, details = _code(
            rerank.Rerank, pb.RerankRequest(text="a dog", candidates_ids=ids), timeout=30
        )
        assert code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DATA_LOSS), details
        assert "vid-005" in details
        # concurrent good calls batched with it are not affected, and later calls work
        reply = rerank.Rerank(pb.RerankRequest(text="a dog", candidates_ids=ids[:5]), timeout=30)
        assert len(reply.ranks) == 5
        # a store entry removed under the server: reported as missing, not an error
        store.delete_many(["vid-004"])
        rerank.Invalidate(pb.InvalidateRequest(all=True), timeout=30)
        reply = rerank.Rerank(pb.RerankRequest(text="a dog", candidates_ids=ids[:5]), timeout=30)
        assert [m.id for m in reply.missing] == ["vid-004"] and len(reply.ranks) == 4


def test_graceful_shutdown_drains_in_flight_calls(tiny):
    components, ids = tiny
    config = ServerConfig(port=0, max_wait_ms=500, max_batch=64)
    running = ServerThread(config, lambda: components).start()
    try:
        with grpc.insecure_channel(running.target) as ch:
            stub = pb_grpc.RerankServiceStub(ch)
            future = stub.Rerank.future(
                pb.RerankRequest(text="a dog", candidates_ids=ids[:4]), timeout=30
            )
            time.sleep(0.15)  # the call waits in its batch window
            stopper = threading.Thread(target=running.stop, kwargs={"grace": 5.0})
            stopper.start()
            assert len(future.result().ranks) == 4  # drained, not cut off
            stopper.join(30)
            code, _ = _code(
                stub.Rerank, pb.RerankRequest(text="a dog", candidates_ids=ids[:4]), timeout=5
            )
            assert code == grpc.StatusCode.UNAVAILABLE
    finally:
        if running.thread.is_alive():
            running.stop()


def test_milvus_unreachable_then_ready_then_lost(tmp_path, milvus_lite_uri):
    """Milvus down at start: Encode/Rerank serve, Search is UNAVAILABLE + NOT_SERVING; once it
    connects, Search serves; when the connection is lost again, Search fails alone."""
    import socket

    from tb_reranker.index import VideoIndex

    components, ids = build_tiny_components(tmp_path, num_videos=6)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    milvus_up = threading.Event()
    attempts = []

    def connect_index():
        attempts.append(time.monotonic())
        if not milvus_up.is_set():
            return VideoIndex(dead, timeout=2)  # real connection attempt: refused
        index = VideoIndex(milvus_lite_uri, collection="t_server_lost", dim=64)
        index.create()
        records = components.reranker.store.get_many(ids)
        index.upsert({"id": i, "cls": records[i].video_cls()} for i in ids)
        return index

    search_service = health_pb2.HealthCheckRequest(service="tb_reranker.v1.SearchService")
    running = ServerThread(
        ServerConfig(port=0), lambda: components, connect_index=connect_index, index_retry_s=0.2
    ).start()
    try:
        with grpc.insecure_channel(running.target) as ch:
            health = health_pb2_grpc.HealthStub(ch)
            search = pb_grpc.SearchServiceStub(ch)
            rerank = pb_grpc.RerankServiceStub(ch)
            deadline = time.monotonic() + 30
            while not attempts and time.monotonic() < deadline:
                time.sleep(0.05)
            assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == 1
            assert health.Check(search_service, timeout=5).status == 2  # NOT_SERVING
            code, details = _code(search.Search, pb.SearchRequest(text="a dog"), timeout=30)
            assert code == grpc.StatusCode.UNAVAILABLE and "Milvus" in details
            assert rerank.Rerank(pb.RerankRequest(text="a dog", candidates_ids=ids), timeout=30)

            milvus_up.set()
            while health.Check(search_service, timeout=5).status != 1:
                assert time.monotonic() < deadline + 30, "Search never became SERVING"
                time.sleep(0.1)
            hits = search.Search(pb.SearchRequest(text="a dog", limit=4, rerank=True), timeout=30)
            assert len(hits.hits) == 4 and all(h.id in ids for h in hits.hits)

            components.index.close()  # the Milvus connection is gone
            code, details = _code(search.Search, pb.SearchRequest(text="a dog"), timeout=30)
            assert code == grpc.StatusCode.UNAVAILABLE and "Milvus" in details
            assert health.Check(search_service, timeout=5).status == 2
            assert rerank.Rerank(pb.RerankRequest(text="a dog", candidates_ids=ids), timeout=30)
    finally:
        running.stop()
