"""Hostile inputs and faults against the network surfaces: the gRPC sidecar and its provider HTTP
endpoints, on real sockets, with a real tiny model, LMDB store and Milvus Lite collection.

For every client mistake: the right status (gRPC code / HTTP 4xx with a JSON error), never
UNKNOWN, INTERNAL or a 5xx, no traceback (and no ERROR line of ours) in the server log, no
server file path in what the caller reads, and the service still healthy afterwards.
Property-based where it fits (Hypothesis: raw protobuf bytes, HTTP bodies, ids, filters).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import socket
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tb_reranker._pb.tb_reranker.v1 import reranker_pb2 as pb
from tb_reranker._pb.tb_reranker.v1 import reranker_pb2_grpc as pb_grpc
from tb_reranker.server.config import ServerConfig
from tb_reranker.server.testing import ServerThread, build_tiny_components, tiny_records
from tb_reranker.wire.convert import tensor_to_proto

TOKEN = "hostile-suite-token"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
SEARCH = "tb_reranker.v1.SearchService"
HYPOTHESIS = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
# loggers whose tracebacks or ERROR lines would mean we mishandled a client's bytes
OURS = ("tb_reranker", "grpc", "aiohttp", "milvus_lite", "pymilvus")
CLIENT_CODES = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.FAILED_PRECONDITION,
}


# ---------------------------------------------------------------------- the world under attack
@dataclasses.dataclass
class World:
    running: ServerThread
    ids: list[str]
    foreign_ids: list[str]
    db_path: str
    store_path: str


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    import torch

    from tb_reranker.index import VideoIndex
    from tb_reranker.model import TokenBinder, TokenBinderConfig

    root = tmp_path_factory.mktemp("hostile")
    components, ids = build_tiny_components(root, num_videos=12)
    model = components.reranker.model
    store = components.reranker.store
    fingerprint = model.fingerprint()
    # what ingest writes: every record names the model that made its tokens
    records = tiny_records(model, ids)
    store.put_many({i: dataclasses.replace(r, fingerprint=fingerprint) for i, r in records.items()})
    # tokens written by another checkpoint (another vision tower) into the same store
    torch.manual_seed(99)
    other = TokenBinder(TokenBinderConfig.tiny()).eval()
    foreign_ids = [f"alien-{n:03d}" for n in range(4)]
    foreign = tiny_records(other, foreign_ids, seed=7)
    store.put_many(
        {i: dataclasses.replace(r, fingerprint=other.fingerprint()) for i, r in foreign.items()}
    )
    db_path = str(root / "milvus.db")
    index = VideoIndex(db_path, collection="hostile", dim=64, fingerprint=fingerprint)
    index.create()
    index.upsert({"id": i, "cls": records[i].video_cls()} for i in ids)
    components.index = index
    config = ServerConfig(
        port=0,
        http_port=0,
        token=TOKEN,
        max_candidates=32,
        max_texts=4,
        max_message_bytes=8 * 1024 * 1024,
    )
    with ServerThread(config, lambda: components) as running:
        yield World(running, ids, foreign_ids, db_path, str(root / "frames"))
    index.close()


@pytest.fixture
def channel(world):
    with grpc.insecure_channel(world.running.target) as ch:
        yield ch


@pytest.fixture
def log(caplog):
    caplog.set_level(logging.INFO)
    return caplog


def assert_clean_log(caplog, *, allow_warnings: bool = True) -> None:
    """No traceback anywhere, no ERROR line from our side, for a client's mistake."""
    for record in caplog.records:
        assert not record.exc_info and not record.exc_text, (
            f"traceback logged by {record.name}: {record.getMessage()[:300]}"
        )
        assert "Traceback" not in record.getMessage(), (record.name, record.getMessage()[:300])
        if record.name.startswith(OURS):
            assert record.levelno < logging.ERROR, (record.name, record.getMessage()[:300])
            if not allow_warnings:
                assert record.levelno < logging.WARNING, (record.name, record.getMessage())


def rpc_error(call, request, **kwargs) -> grpc.RpcError:
    kwargs.setdefault("timeout", 60)
    kwargs.setdefault("metadata", AUTH)
    with pytest.raises(grpc.RpcError) as info:
        call(request, **kwargs)
    return info.value


def search_health(channel) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return stub.Check(health_pb2.HealthCheckRequest(service=SEARCH), timeout=10).status


def post(world, path: str, body, *, token: str | None = TOKEN, headers=None):
    """(status, parsed JSON body or None, raw bytes) of a POST to the provider endpoints."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    all_headers = {"Content-Type": "application/json"}
    if token:
        all_headers["Authorization"] = f"Bearer {token}"
    all_headers.update(headers or {})
    request = urllib.request.Request(
        f"http://127.0.0.1:{world.running.server.http_port}{path}",
        data=data,
        headers={k: v for k, v in all_headers.items() if v is not None},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            raw, status = response.read(), response.status
    except urllib.error.HTTPError as exc:
        raw, status = exc.read(), exc.code
    try:
        parsed = json.loads(raw) if raw else None
    except ValueError:
        parsed = None
    return status, parsed, raw


# ---------------------------------------------------------------------- wrong results, silently
def test_rerank_refuses_tokens_of_another_checkpoint(world, channel, log):
    """Rerank over gRPC and HTTP reading frame tokens another model wrote: refused with
    FAILED_PRECONDITION / 412 naming the mismatch, not scored."""
    rerank = pb_grpc.RerankServiceStub(channel)
    error = rpc_error(
        rerank.Rerank, pb.RerankRequest(text="a dog", candidates_ids=world.foreign_ids)
    )
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION, error.details()
    assert "model" in error.details()
    mixed = [world.ids[0], world.foreign_ids[0]]
    error = rpc_error(rerank.Rerank, pb.RerankRequest(text="a dog", candidates_ids=mixed))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    for path, key in (("/rerank", "texts"), ("/v1/rerank", "documents")):
        status, body, _ = post(world, path, {"query": "a dog", key: world.foreign_ids})
        assert status == 412 and "model" in body["error"], (path, status, body)
    # the model's own tokens still rerank
    reply = rerank.Rerank(
        pb.RerankRequest(text="a dog", candidates_ids=world.ids[:4]), timeout=60, metadata=AUTH
    )
    assert len(reply.ranks) == 4
    assert_clean_log(log)


@pytest.mark.parametrize("value", [3e38, -3e38, 1e20, 1e5, np.finfo(np.float32).max])
def test_huge_finite_indicators_are_refused_never_nan(world, channel, value, log):
    rerank = pb_grpc.RerankServiceStub(channel)
    search = pb_grpc.SearchServiceStub(channel)
    indicators = np.full((4, 64), value, np.float32)
    error = rpc_error(
        rerank.Rerank,
        pb.RerankRequest(indicators=tensor_to_proto(indicators), candidates_ids=world.ids[:3]),
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "indicator" in error.details()
    error = rpc_error(search.Search, pb.SearchRequest(indicators=tensor_to_proto(indicators)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert_clean_log(log)


@HYPOTHESIS
@given(
    scale=st.floats(min_value=-1e4, max_value=1e4, allow_nan=False),
    seed=st.integers(0, 2**16),
    broad=st.lists(
        st.floats(min_value=-1e12, max_value=1e12, allow_nan=False), min_size=3, max_size=3
    ),
)
def test_accepted_inputs_always_give_finite_scores(world, channel, scale, seed, broad):
    """Any indicators and broad scores the server accepts give finite scores (no NaN)."""
    indicators = np.random.default_rng(seed).standard_normal((4, 64)).astype(np.float32)
    indicators = np.clip(indicators * np.float32(scale), -1e4, 1e4)
    reply = pb_grpc.RerankServiceStub(channel).Rerank(
        pb.RerankRequest(
            indicators=tensor_to_proto(indicators), candidates_ids=world.ids[:3], broad_scores=broad
        ),
        timeout=60,
        metadata=AUTH,
    )
    assert len(reply.ranks) == 3
    assert all(math.isfinite(r.score) and math.isfinite(r.delta) for r in reply.ranks)


# ---------------------------------------------------------------------- malformed protobuf bytes
RAW_CASES = {
    "truncated varint": b"\xff\xff\xff",
    "bad wire type": b"\x0f",
    "length past end": b"\x0a\x7fabc",
    "invalid utf-8 in a string field": b"\x0a\x02\xff\xfe",
    "group start without end": b"\x0b",
    "field number zero": b"\x00\x01",
}


@pytest.mark.parametrize("name", sorted(RAW_CASES))
@pytest.mark.parametrize(
    "method",
    [
        "/tb_reranker.v1.RerankService/Rerank",
        "/tb_reranker.v1.EncodeService/Encode",
        "/tb_reranker.v1.SearchService/Search",
        "/grpc.health.v1.Health/Check",
    ],
)
def test_undecodable_protobuf_is_invalid_argument(world, channel, name, method, log):
    raw = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
    error = rpc_error(raw, RAW_CASES[name])
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (name, error.details())
    if not method.startswith("/grpc.health"):  # health is open; the rest need the token
        error = rpc_error(raw, RAW_CASES[name], metadata=())
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED, (name, error.details())
    assert_clean_log(log)


def test_undecodable_requests_are_logged_once_per_method(world, channel, caplog):
    caplog.set_level(logging.DEBUG, logger="tb_reranker")
    raw = channel.unary_unary(
        "/tb_reranker.v1.InfoService/Info", request_serializer=None, response_deserializer=None
    )
    for _ in range(20):
        assert rpc_error(raw, b"\x0f").code() == grpc.StatusCode.INVALID_ARGUMENT
    warnings = [
        r for r in caplog.records if r.levelno >= logging.WARNING and "undecodable" in r.message
    ]
    assert len(warnings) <= 1
    assert_clean_log(caplog)


@HYPOTHESIS
@given(data=st.binary(max_size=512))
def test_random_bytes_never_unknown_or_internal(world, channel, data):
    raw = channel.unary_unary(
        "/tb_reranker.v1.RerankService/Rerank",
        request_serializer=None,
        response_deserializer=None,
    )
    try:
        raw(data, timeout=60, metadata=AUTH)
    except grpc.RpcError as exc:
        assert exc.code() in CLIENT_CODES, (data, exc.code(), exc.details())


# ---------------------------------------------------------------------- filters
BAD_FILTERS = {
    "unterminated string": 'id == "',
    "unterminated single quote": "id == 'a",
    "unbalanced open": '((id == "a")',
    "unbalanced close": 'id == "a")',
    "5000 nested": "(" * 5000 + 'id == "a"' + ")" * 5000,
    "brackets deep": "[" * 100,
    "mismatched brackets": '(id in ["a")]',
    "dangling operator": "id >",
    "dangling and": 'id == "a" and',
    "unknown function": 'foo(id) == "a"',
    "like without a string": "id like 5",
    "incompatible types": 'duration_s > "x"',
    "control character": 'id == "a" \x00',
    "double operator": 'id == "a" or or id == "b"',
}


@pytest.mark.parametrize("name", sorted(BAD_FILTERS))
def test_bad_filter_is_invalid_argument_and_search_stays_serving(world, channel, name, log):
    search = pb_grpc.SearchServiceStub(channel)
    error = rpc_error(search.Search, pb.SearchRequest(text="a dog", filter=BAD_FILTERS[name]))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (name, error.details())
    assert search_health(channel) == health_pb2.HealthCheckResponse.SERVING
    assert world.db_path not in error.details()
    assert_clean_log(log)


def test_huge_filter_is_refused_before_milvus(world, channel, log):
    """The 5.9 MB ``id in [...]`` that held Milvus for seconds: refused at once by its size."""
    ids = ", ".join(f'"video-{n:07d}"' for n in range(400_000))
    huge = f"id in [{ids}]"
    assert len(huge) > 5_000_000
    error = rpc_error(
        pb_grpc.SearchServiceStub(channel).Search, pb.SearchRequest(text="a", filter=huge)
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "max_filter_chars" in error.details()
    assert_clean_log(log)


@HYPOTHESIS
@given(
    text=st.text(
        alphabet=st.sampled_from(list("()[]{}\"'\\ =<>!andorinotlike_id0123456789,.*%\n")),
        max_size=80,
    )
)
def test_random_filters_never_blame_the_server(world, channel, text):
    """Any filter text: OK or INVALID_ARGUMENT, and Search health stays SERVING."""
    try:
        pb_grpc.SearchServiceStub(channel).Search(
            pb.SearchRequest(text="a dog", filter=text, limit=3), timeout=60, metadata=AUTH
        )
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, (text, exc.code(), exc.details())
    assert search_health(channel) == health_pb2.HealthCheckResponse.SERVING


def test_valid_filters_still_work(world, channel):
    search = pb_grpc.SearchServiceStub(channel)
    for expression in (f'id == "{world.ids[2]}"', f'id in ["{world.ids[2]}", "{world.ids[3]}"]'):
        reply = search.Search(
            pb.SearchRequest(text="a dog", filter=expression, limit=5), timeout=60, metadata=AUTH
        )
        assert {h.id for h in reply.hits} <= {world.ids[2], world.ids[3]} and reply.hits


# ---------------------------------------------------------------------- other gRPC inputs
GRPC_CASES = {
    "search limit too large": ("search", pb.SearchRequest(text="a", limit=10_000)),
    "search empty text": ("search", pb.SearchRequest(text="   ")),
    "search no query": ("search", pb.SearchRequest(limit=3)),
    "search text too long": ("search", pb.SearchRequest(text="x" * 5000)),
    "rerank path-like id": ("rerank", pb.RerankRequest(text="a", candidates_ids=["../etc"])),
    "rerank slash id": ("rerank", pb.RerankRequest(text="a", candidates_ids=["a/b"])),
    "rerank overlong id": ("rerank", pb.RerankRequest(text="a", candidates_ids=["v" * 300])),
    "rerank unicode id": ("rerank", pb.RerankRequest(text="a", candidates_ids=["vidé"])),
    "rerank huge broad score": (
        "rerank",
        pb.RerankRequest(text="a", candidates_ids=["vid-000"], broad_scores=[1e300]),
    ),
    "rerank infinite broad score": (
        "rerank",
        pb.RerankRequest(text="a", candidates_ids=["vid-000"], broad_scores=[math.inf]),
    ),
    "rerank huge shape": (
        "rerank",
        pb.RerankRequest(
            indicators=pb.FloatTensor(shape=[2**31, 2**31], data=b""), candidates_ids=["vid-000"]
        ),
    ),
    "rerank hash count": (
        "rerank",
        pb.RerankRequest(text="a", candidates_ids=["vid-000"], contents_hashes=["a", "b"]),
    ),
    "encode too many texts": ("encode", pb.EncodeRequest(texts=["a"] * 5)),
    "encode empty": ("encode", pb.EncodeRequest()),
}


@pytest.mark.parametrize("name", sorted(GRPC_CASES))
def test_grpc_bad_requests_are_invalid_argument(world, channel, name, log):
    kind, request = GRPC_CASES[name]
    call = {
        "search": pb_grpc.SearchServiceStub(channel).Search,
        "rerank": pb_grpc.RerankServiceStub(channel).Rerank,
        "encode": pb_grpc.EncodeServiceStub(channel).Encode,
    }[kind]
    error = rpc_error(call, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (name, error.details())
    assert_clean_log(log)


@HYPOTHESIS
@given(ids=st.lists(st.text(max_size=40), min_size=1, max_size=8))
def test_random_candidate_ids(world, channel, ids):
    """Any id strings: ranked, reported missing or INVALID_ARGUMENT; never a server error."""
    try:
        reply = pb_grpc.RerankServiceStub(channel).Rerank(
            pb.RerankRequest(text="a dog", candidates_ids=ids), timeout=60, metadata=AUTH
        )
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, (ids, exc.code(), exc.details())
        return
    assert len(reply.ranks) + len(reply.missing) == len(ids)


# ---------------------------------------------------------------------- paths never leave
def test_error_details_do_not_carry_server_paths(world, log):
    """An index whose collection is gone: FAILED_PRECONDITION (the server's state, not the
    caller's mistake) without the .db path, which the server log keeps."""
    from tb_reranker.index import VideoIndex

    components = world.running.server.engine.components
    config = ServerConfig(port=0, http_port=0)
    broken = dataclasses.replace(
        components, index=VideoIndex(world.db_path, collection="gone", dim=64)
    )
    with (
        ServerThread(config, lambda: broken) as running,
        grpc.insecure_channel(running.target) as ch,
    ):
        error = rpc_error(pb_grpc.SearchServiceStub(ch).Search, pb.SearchRequest(text="a dog"))
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION, error.details()
        assert "gone" in error.details()
        assert search_health(ch) == health_pb2.HealthCheckResponse.NOT_SERVING
        assert world.db_path not in error.details() and "/tmp" not in error.details()
        assert "<path>" in error.details()
    assert any(world.db_path in r.getMessage() for r in log.records)  # kept server-side
    broken.index.close()


# ---------------------------------------------------------------------- HTTP bodies
HTTP_CASES = {
    "invalid utf-8": (b'{"query": "\xff\xfe", "texts": ["a"]}', None, {400}),
    "deep nesting": (b"[" * 100_000 + b"]" * 100_000, None, {400}),
    "deep object nesting": (b'{"a":' * 50_000 + b"1" + b"}" * 50_000, None, {400}),
    "NaN literal": (b'{"query": NaN, "documents": ["a"]}', None, {400}),
    "Infinity literal": (
        b'{"query": "a", "documents": ["vid-000"], "top_n": Infinity}',
        None,
        {400},
    ),
    "top level array": (b'["vid-000"]', None, {400}),
    "top level string": (b'"hello"', None, {400}),
    "empty body": (b"", None, {400}),
    "truncated json": (b'{"query": "a", "documents": [', None, {400}),
    "unknown charset": (b'{"query": "a"}', "application/json; charset=nonsense", {415}),
    "latin-1 charset": (b'{"query": "a"}', "application/json; charset=latin-1", {415}),
    "form content type": (b"query=a", "application/x-www-form-urlencoded", {415}),
    "multipart content type": (b"--x--", "multipart/form-data; boundary=x", {415}),
    "huge integer": (
        b'{"query": "a", "documents": ["vid-000"], "top_n": 1' + b"0" * 5000 + b"}",
        None,
        {400},
    ),
    "wrong return_text type": (
        json.dumps({"query": "a", "texts": ["vid-000"], "return_text": {"x": 1}}).encode(),
        None,
        {400},
    ),
    "query is a list": (
        json.dumps({"query": ["a"], "documents": ["vid-000"]}).encode(),
        None,
        {400},
    ),
    "query is null": (json.dumps({"query": None, "documents": ["vid-000"]}).encode(), None, {400}),
    "documents is a dict": (
        json.dumps({"query": "a", "documents": {"a": 1}}).encode(),
        None,
        {400},
    ),
    "document of a number": (json.dumps({"query": "a", "documents": [1, 2]}).encode(), None, {400}),
    "document path-like": (
        json.dumps({"query": "a", "documents": ["../../x"]}).encode(),
        None,
        {400},
    ),
    "top_n string": (
        json.dumps({"query": "a", "documents": ["vid-000"], "top_n": "3"}).encode(),
        None,
        {400},
    ),
    "top_n bool": (
        json.dumps({"query": "a", "documents": ["vid-000"], "top_n": True}).encode(),
        None,
        {400},
    ),
    "lone surrogate id": (b'{"query": "a", "documents": ["\\ud800"]}', None, {400}),
    "query too long": (
        json.dumps({"query": "x" * 5000, "documents": ["vid-000"]}).encode(),
        None,
        {400},
    ),
}


@pytest.mark.parametrize("name", sorted(HTTP_CASES))
@pytest.mark.parametrize("path", ["/rerank", "/v1/rerank"])
def test_http_hostile_bodies_get_4xx_json(world, name, path, log):
    body, content_type, expected = HTTP_CASES[name]
    headers = {"Content-Type": content_type} if content_type else None
    status, parsed, raw = post(world, path, body, headers=headers)
    assert 400 <= status < 500, (name, status, raw[:200])
    if path == "/v1/rerank" or "texts" in body.decode("utf-8", "replace") or status != 400:
        assert status in expected, (name, status, raw[:200])
    assert isinstance(parsed, dict) and "error" in parsed, raw[:200]
    assert_clean_log(log)


def test_http_oversized_body_is_413_json(world, log):
    status, parsed, _ = post(world, "/v1/rerank", b" " * (9 * 1024 * 1024))
    assert status == 413 and "error" in parsed
    assert_clean_log(log)


def test_http_gzip_bomb_is_refused(world, log):
    import gzip

    bomb = gzip.compress(b"[" * (20 * 1024 * 1024))
    status, parsed, raw = post(world, "/v1/rerank", bomb, headers={"Content-Encoding": "gzip"})
    assert status == 413 and "error" in parsed, (status, raw[:200])
    assert_clean_log(log)


def test_http_unknown_route_and_method_are_json(world, log):
    status, parsed, _ = post(world, "/v9/rerank", {"query": "a"})
    assert status == 404 and "error" in parsed
    url = f"http://127.0.0.1:{world.running.server.http_port}/v1/rerank"
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(url, timeout=30)
    assert info.value.code == 405
    assert_clean_log(log)


@HYPOTHESIS
@given(
    body=st.recursive(
        st.none()
        | st.booleans()
        | st.integers()
        | st.floats(allow_nan=False)
        | st.text(max_size=20),
        lambda children: (
            st.lists(children, max_size=4)
            | st.dictionaries(
                st.sampled_from(["query", "documents", "texts", "top_n", "return_text", "x"]),
                children,
                max_size=5,
            )
        ),
        max_leaves=12,
    ),
    path=st.sampled_from(["/rerank", "/v1/rerank", "/v2/rerank"]),
)
def test_http_random_json_never_5xx(world, body, path):
    status, parsed, raw = post(world, path, body)
    assert status < 500, (body, status, raw[:200])
    assert status == 200 or (isinstance(parsed, dict) and "error" in parsed)


@HYPOTHESIS
@given(data=st.binary(max_size=256), path=st.sampled_from(["/rerank", "/v1/rerank"]))
def test_http_random_bytes_never_5xx(world, data, path):
    status, parsed, raw = post(world, path, data)
    assert 400 <= status < 500, (data, status, raw[:200])


# ---------------------------------------------------------------------- auth and tokens
def test_client_token_with_trailing_newline_works(world):
    from tb_reranker.remote import RemoteReranker

    with RemoteReranker(world.running.target, token=TOKEN + "\n", timeout=30) as remote:
        assert remote.info()["model_fingerprint"]


@pytest.mark.parametrize("token", [" ", "\n", "two words", "tab\there", "nul\x00", "é"])
def test_client_bad_token_is_a_clear_error(world, token):
    from tb_reranker.errors import InvalidInputError
    from tb_reranker.remote import RemoteReranker

    with pytest.raises(InvalidInputError, match="token"):
        RemoteReranker(world.running.target, token=token)


@pytest.mark.parametrize(
    "header",
    ["Bearer", "Bearer ", "Basic " + TOKEN, TOKEN, "Bearer " + TOKEN + "x", "Bearer  "],
)
def test_wrong_credentials(world, channel, header, log):
    error = rpc_error(
        pb_grpc.InfoServiceStub(channel).Info,
        pb.InfoRequest(),
        metadata=(("authorization", header),),
    )
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    status, parsed, _ = post(
        world,
        "/v1/rerank",
        {"query": "a", "documents": ["vid-000"]},
        token=None,
        headers={"Authorization": header},
    )
    assert status == 401 and "error" in parsed
    assert_clean_log(log)


# ---------------------------------------------------------------------- the server keeps serving
def test_still_healthy_after_the_attacks(world, channel):
    assert search_health(channel) == health_pb2.HealthCheckResponse.SERVING
    reply = pb_grpc.SearchServiceStub(channel).Search(
        pb.SearchRequest(text="a dog", limit=5), timeout=60, metadata=AUTH
    )
    assert len(reply.hits) == 5
    status, body, _ = post(world, "/v1/rerank", {"query": "a dog", "documents": world.ids[:5]})
    assert status == 200 and len(body["results"]) == 5


def test_port_in_use_is_a_clear_error(world):
    """Binding a taken port: InvalidInputError naming the address (the CLI exits 2)."""
    from tb_reranker.errors import InvalidInputError

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        taken = sock.getsockname()[1]
        components = world.running.server.engine.components
        for config in (ServerConfig(port=taken), ServerConfig(port=0, http_port=taken)):
            running = ServerThread(config, lambda: components, wait_ready=False)
            running.thread.start()
            try:
                with pytest.raises(InvalidInputError, match=str(taken)):
                    running.run(running.server.start())
            finally:
                running.loop.call_soon_threadsafe(running.loop.stop)
                running.thread.join(10)


# ---------------------------------------------------------------------- SDK mistakes
def test_sdk_empty_query_list_and_non_string_filter(world, tmp_path):
    """``search_many([])`` says there is no query (not a shape error); a non-string filter is
    InvalidInputError naming the filter, in process and through the remote transport."""
    from tb_reranker import Client
    from tb_reranker.errors import InvalidInputError
    from tb_reranker.remote import RemoteReranker
    from tb_reranker.rerank import InProcessBackend, TwoStageSearch

    components = world.running.server.engine.components
    reranker, index = components.reranker, components.index
    pipeline = TwoStageSearch(index, InProcessBackend(reranker))
    with pytest.raises(InvalidInputError, match="no quer"):
        pipeline.search([])
    for bad in (5, ["id"], {"id": "a"}):
        with pytest.raises(InvalidInputError, match="filter must be a string"):
            pipeline.search(["a dog"], filter=bad)
    client = Client(
        uri=world.db_path,
        collection="hostile",
        store=str(tmp_path / "frames"),
        model=reranker.model,
    )
    with client:
        with pytest.raises(InvalidInputError, match="no query"):
            client.search_many([])
        with pytest.raises(InvalidInputError, match="filter must be a string"):
            client.search("a dog", filter=5)
        with pytest.raises(InvalidInputError, match="string"):
            client.search_many(["a dog", 3])
    with RemoteReranker(world.running.target, token=TOKEN, timeout=30) as remote:
        with pytest.raises(InvalidInputError, match="filter must be a string"):
            remote.search(["a dog"], filter=5)
        with pytest.raises(InvalidInputError, match="unterminated"):
            remote.search(["a dog"], filter='id == "')
        # the limits are the server's: checked there, mapped back to the same type
        with pytest.raises(InvalidInputError, match="max_filter_depth"):
            remote.search(["a dog"], filter="(" * 50 + 'id == "a"' + ")" * 50)
