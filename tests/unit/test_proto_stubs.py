"""The committed stubs match the proto, the wire contract follows its rules, conversions round-trip."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tb_reranker._pb.tb_reranker.v1 import reranker_pb2 as pb
from tb_reranker.errors import InvalidInputError
from tb_reranker.server import protogen
from tb_reranker.server.config import ServerConfig
from tb_reranker.types import Hit
from tb_reranker.wire.convert import (
    hit_from_proto,
    hit_to_proto,
    metadata_from_proto,
    metadata_to_proto,
    tensor_from_proto,
    tensor_to_proto,
)


def test_committed_stubs_match_a_fresh_generation(tmp_path):
    written = protogen.generate(tmp_path)
    fresh = {p.relative_to(tmp_path): p.read_text() for p in written}
    assert any(str(p).endswith("reranker_pb2_grpc.py") for p in fresh)
    for relative, text in fresh.items():
        committed = protogen.PB_ROOT / relative
        assert committed.exists(), f"{relative} is not committed: run `make proto`"
        assert committed.read_text() == text, f"{relative} is stale: run `make proto`"
    grpc_module = fresh[next(p for p in fresh if str(p).endswith("_pb2_grpc.py"))]
    assert "from tb_reranker._pb.tb_reranker.v1 import reranker_pb2" in grpc_module


def test_contract_rules():
    descriptor = pb.DESCRIPTOR
    assert descriptor.package == "tb_reranker.v1"
    assert descriptor.name == "tb_reranker/v1/reranker.proto"
    services = {s.name: s for s in descriptor.services_by_name.values()}
    assert set(services) == {"EncodeService", "RerankService", "SearchService", "InfoService"}
    for service in services.values():
        for method in service.methods:
            assert method.input_type.name == f"{method.name}Request"
            assert method.output_type.name == f"{method.name}Response"
    for enum in descriptor.enum_types_by_name.values():
        zero = enum.values_by_number[0].name
        assert zero.endswith("_UNSPECIFIED"), zero
    assert pb.RerankRequest.DESCRIPTOR.oneofs_by_name["query"].fields[0].name == "text"


def test_tensor_round_trip_and_validation():
    array = np.arange(24, dtype=np.float32).reshape(2, 3, 4) / 7
    message = tensor_to_proto(array)
    assert list(message.shape) == [2, 3, 4] and len(message.data) == 96
    np.testing.assert_array_equal(tensor_from_proto(message), array)
    with pytest.raises(InvalidInputError, match="carries 8 bytes"):
        tensor_from_proto(pb.FloatTensor(shape=[2, 3], data=b"\0" * 8))
    with pytest.raises(InvalidInputError, match="no shape"):
        tensor_from_proto(pb.FloatTensor())


def test_metadata_and_hit_round_trip():
    timings = {"fetch_ns": 5, "fusion_ns": 7, "total_ns": 20, "batch_size": 3, "other": 1}
    back = metadata_from_proto(metadata_to_proto(timings, queue_ns=2))
    assert back == {
        "queue_ns": 2,
        "encode_ns": 0,
        "fetch_ns": 5,
        "fusion_ns": 7,
        "total_ns": 20,
        "batch_size": 3,
    }
    hit = Hit(
        id="v1",
        score=0.1 + 0.2,  # a double, kept exactly
        broad_score=math.pi,
        delta=-1e-9,
        rank=1,
        reranked=True,
        broad_rank=3,
        best_frame_s=1.5,
        metadata={"uri": "file:///a.mp4", "count": 2**40 + 1, "tags": ["a"], "x": np.float32(2)},
    )
    back = hit_from_proto(hit_to_proto(hit))
    assert back.score == hit.score and back.broad_score == hit.broad_score
    assert back.metadata == {"uri": "file:///a.mp4", "count": 2**40 + 1, "tags": ["a"], "x": 2.0}
    assert hit_from_proto(hit_to_proto(Hit("v2", 1.0, 1.0, 0.0, 1, False))).best_frame_s is None


def test_server_config_env(monkeypatch):
    monkeypatch.setenv("TB_SERVE_PORT", "6000")
    monkeypatch.setenv("TB_SERVE_BATCHING", "off")
    monkeypatch.setenv("TB_SERVE_MAX_WAIT_MS", "1.5")
    config = ServerConfig.from_env(max_batch=8)
    assert (config.port, config.batching, config.max_wait_ms, config.max_batch) == (
        6000,
        False,
        1.5,
        8,
    )
    assert config.host == "127.0.0.1"  # secure default
    monkeypatch.setenv("TB_SERVE_PORT", "many")
    with pytest.raises(InvalidInputError, match="TB_SERVE_PORT"):
        ServerConfig.from_env()
    with pytest.raises(InvalidInputError, match="together"):
        ServerConfig(tls_cert="a.pem")
    with pytest.raises(InvalidInputError, match="max_candidates"):
        ServerConfig(max_candidates=0)
