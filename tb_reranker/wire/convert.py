"""Conversions between numpy / result dataclasses / request objects and the ``tb_reranker.v1``
messages.

Shared by the servicers and the remote client so both ends agree on one encoding. A request
object (``tb_reranker.requests``) is validated before it is converted; a message read here is
validated by the server's ``ServingEngine`` (the gRPC boundary) after conversion.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from tb_reranker._pb.tb_reranker.v1 import reranker_pb2 as pb
from tb_reranker.errors import InvalidInputError
from tb_reranker.requests import DEFAULT_MOMENTS_PER_VIDEO, RerankRequest, SearchRequest
from tb_reranker.types import Hit, Moment, RerankedCandidate, RerankResult

__all__ = [
    "tensor_to_proto",
    "tensor_from_proto",
    "metadata_to_proto",
    "metadata_from_proto",
    "hit_to_proto",
    "hit_from_proto",
    "rerank_request_to_proto",
    "candidates_are_from_proto",
    "rerank_result_to_proto",
    "rerank_result_from_proto",
    "search_request_to_proto",
    "search_options_from_proto",
    "info_from_proto",
]

_DTYPE = np.dtype("<f4")
MAX_TENSOR_RANK = 8  # dimensions a FloatTensor may have (the messages use at most 3)
_TIMING_FIELDS = ("queue_ns", "encode_ns", "fetch_ns", "fusion_ns", "total_ns")


def tensor_to_proto(array: Any) -> pb.FloatTensor:
    """Any array-like → ``FloatTensor`` (packed little-endian float32, row-major)."""
    values = np.ascontiguousarray(np.asarray(array, dtype=_DTYPE))
    return pb.FloatTensor(shape=list(values.shape), data=values.tobytes())


def tensor_from_proto(message: pb.FloatTensor, *, name: str = "tensor") -> np.ndarray:
    """``FloatTensor`` → float32 array. A shape that cannot describe the bytes carried (none, a
    zero or oversized dimension, more than :data:`MAX_TENSOR_RANK` dimensions, a product that
    disagrees with the byte length) is ``InvalidInputError``, never an array."""
    shape = tuple(int(s) for s in message.shape)
    if not shape:
        raise InvalidInputError(f"{name} has no shape")
    if len(shape) > MAX_TENSOR_RANK:
        raise InvalidInputError(
            f"{name} has {len(shape)} dimensions; at most {MAX_TENSOR_RANK} are allowed"
        )
    if min(shape) <= 0:
        raise InvalidInputError(f"{name} has shape {list(shape)}: every dimension must be >= 1")
    values = len(message.data) // _DTYPE.itemsize
    # the product of the dimensions may not exceed the values carried: checked dimension by
    # dimension, so a shape like [2**31, 2**31, 2**31] never builds a huge number
    product = 1
    for size in shape:
        product *= size
        if product > values:
            break
    if product != values or len(message.data) % _DTYPE.itemsize:
        raise InvalidInputError(
            f"{name} has shape {list(shape)} but carries {len(message.data)} bytes "
            f"(float32: 4 bytes per value, {_DTYPE.itemsize} x the product of the shape)"
        )
    return np.frombuffer(message.data, dtype=_DTYPE).reshape(shape).astype(np.float32)


def metadata_to_proto(timings: dict[str, int] | None, **extra: int) -> pb.Metadata:
    """Timing dict (``*_ns`` keys, ``batch_size``) → ``Metadata``; unknown keys are ignored."""
    merged = {**(timings or {}), **extra}
    return pb.Metadata(
        **{key: int(merged[key]) for key in _TIMING_FIELDS if key in merged},
        batch_size=int(merged.get("batch_size", 0)),
    )


def metadata_from_proto(message: pb.Metadata) -> dict[str, int]:
    """``Metadata`` → the timing dict of the in-process results (``*_ns``, ``batch_size``)."""
    out = {key: int(getattr(message, key)) for key in _TIMING_FIELDS}
    out["batch_size"] = int(message.batch_size)
    return out


def _scored(kind: Any, item: Hit | RerankedCandidate, **fields: Any) -> Any:
    """A ``SearchHit`` / ``RankedCandidate`` with the scores both carry (+ ``fields``)."""
    message = kind(
        id=item.id,
        score=item.score,
        broad_score=item.broad_score,
        delta=item.delta,
        reranked=item.reranked,
        **fields,
    )
    if item.best_frame_s is not None:
        message.best_frame_s = item.best_frame_s
    return message


# SearchRequest.group on the wire (SearchGroup) and back
GROUP_TO_PROTO = {"video": pb.SEARCH_GROUP_VIDEO, "moment": pb.SEARCH_GROUP_MOMENT}
GROUP_FROM_PROTO = {
    pb.SEARCH_GROUP_UNSPECIFIED: "video",  # older clients
    **{value: name for name, value in GROUP_TO_PROTO.items()},
}


def hit_to_proto(hit: Hit) -> pb.SearchHit:
    metadata = json.dumps(hit.metadata, default=_json_default, allow_nan=False)
    message = _scored(
        pb.SearchHit, hit, rank=hit.rank, broad_rank=hit.broad_rank, metadata_json=metadata
    )
    if hit.start_s is not None:
        message.start_s = hit.start_s
    if hit.end_s is not None:
        message.end_s = hit.end_s
    message.moments.extend(
        pb.Moment(start_s=m.start_s, end_s=m.end_s, score=m.score, broad_score=m.broad_score)
        for m in hit.moments
    )
    return message


def hit_from_proto(message: pb.SearchHit) -> Hit:
    return Hit(
        id=message.id,
        score=float(message.score),
        broad_score=float(message.broad_score),
        delta=float(message.delta),
        rank=int(message.rank),
        reranked=bool(message.reranked),
        broad_rank=int(message.broad_rank),
        best_frame_s=float(message.best_frame_s) if message.HasField("best_frame_s") else None,
        metadata=json.loads(message.metadata_json) if message.metadata_json else {},
        start_s=float(message.start_s) if message.HasField("start_s") else None,
        end_s=float(message.end_s) if message.HasField("end_s") else None,
        moments=[
            Moment(float(m.start_s), float(m.end_s), float(m.score), float(m.broad_score))
            for m in message.moments
        ],
    )


# RerankRequest.candidates_are on the wire (CandidatesAre) and back
CANDIDATES_TO_PROTO = {"video": pb.CANDIDATES_ARE_VIDEO, "segment": pb.CANDIDATES_ARE_SEGMENT}
CANDIDATES_FROM_PROTO = {
    pb.CANDIDATES_ARE_UNSPECIFIED: "video",  # older clients: video ids
    **{value: name for name, value in CANDIDATES_TO_PROTO.items()},
}


def candidates_are_from_proto(message: pb.RerankRequest) -> str:
    """What a ``RerankRequest`` message's ids name ("video" unless set; an unknown value is
    ``InvalidInputError``)."""
    kind = CANDIDATES_FROM_PROTO.get(message.candidates_are)
    if kind is None:
        raise InvalidInputError(f"unknown candidates_are {message.candidates_are}")
    return kind


def rerank_request_to_proto(
    request: RerankRequest, query_fingerprint: str = ""
) -> list[pb.RerankRequest]:
    """One ``RerankRequest`` message per query of ``request`` (sent as concurrent RPCs);
    ``query_fingerprint``: that of the model that encoded the indicators ("" = not known)."""
    messages = []
    for q, ids in enumerate(request.candidates_ids):
        message = pb.RerankRequest(
            indicators=tensor_to_proto(request.indicators[q]),
            candidates_ids=ids,
            top_n=request.top_n or 0,
            strict=request.strict,
            query_fingerprint=query_fingerprint,
            candidates_are=CANDIDATES_TO_PROTO[request.candidates_are],
        )
        if request.broad_scores[q] is not None:
            message.broad_scores.extend(request.broad_scores[q])
        if request.contents_hashes[q] is not None:
            message.contents_hashes.extend(h or "" for h in request.contents_hashes[q])
        messages.append(message)
    return messages


def rerank_result_to_proto(
    result: RerankResult, candidates_ids: list[str], timings: dict[str, int]
) -> pb.RerankResponse:
    """``RerankResult`` → ``RerankResponse`` (missing ids keep their request index)."""
    positions = {video_id: n for n, video_id in enumerate(candidates_ids)}
    ranks = [_ranked(candidate) for candidate in result.candidates]
    missing = [
        pb.MissingCandidate(
            id=video_id, index=positions[video_id], reason=pb.MISSING_REASON_NOT_IN_STORE
        )
        for video_id in result.missing_ids
    ]
    return pb.RerankResponse(ranks=ranks, missing=missing, metadata=metadata_to_proto(timings))


def _ranked(candidate: RerankedCandidate) -> pb.RankedCandidate:
    message = _scored(pb.RankedCandidate, candidate, index=candidate.index)
    if candidate.start_s is not None:
        message.start_s = candidate.start_s
    if candidate.end_s is not None:
        message.end_s = candidate.end_s
    return message


def rerank_result_from_proto(response: pb.RerankResponse) -> RerankResult:
    candidates = [
        RerankedCandidate(
            id=rank.id,
            index=int(rank.index),
            score=float(rank.score),
            broad_score=float(rank.broad_score),
            delta=float(rank.delta),
            best_frame_s=float(rank.best_frame_s) if rank.HasField("best_frame_s") else None,
            reranked=bool(rank.reranked),
            start_s=float(rank.start_s) if rank.HasField("start_s") else None,
            end_s=float(rank.end_s) if rank.HasField("end_s") else None,
        )
        for rank in response.ranks
    ]
    return RerankResult(
        candidates=candidates,
        missing_ids=[missing.id for missing in response.missing],
        timings=metadata_from_proto(response.metadata),
    )


def search_request_to_proto(
    request: SearchRequest, query_fingerprint: str = ""
) -> list[pb.SearchRequest]:
    """One ``SearchRequest`` message per query of ``request`` (``query_fingerprint``: as in
    :func:`rerank_request_to_proto`, sent with indicators only)."""
    common = {
        "limit": request.limit,
        "rerank": request.rerank,
        "filter": request.filter or "",
        "group": GROUP_TO_PROTO[request.group],
        "moments_per_video": request.moments_per_video,
    }
    if request.texts is not None:
        return [pb.SearchRequest(text=text, **common) for text in request.texts]
    assert request.indicators is not None
    return [
        pb.SearchRequest(
            indicators=tensor_to_proto(query), query_fingerprint=query_fingerprint, **common
        )
        for query in request.indicators
    ]


def search_options_from_proto(message: pb.SearchRequest) -> dict[str, Any]:
    """A ``SearchRequest`` message's options as ``SearchRequest.build`` takes them (0 = the
    default: limit 10, 3 moments per video; an unknown group is ``InvalidInputError``)."""
    group = GROUP_FROM_PROTO.get(message.group)
    if group is None:
        raise InvalidInputError(f"unknown search group {message.group}")
    return {
        "limit": int(message.limit) or 10,
        "rerank": bool(message.rerank),
        "filter": message.filter or None,
        "group": group,
        "moments_per_video": int(message.moments_per_video) or DEFAULT_MOMENTS_PER_VIDEO,
    }


def info_from_proto(response: pb.InfoResponse) -> dict[str, Any]:
    from google.protobuf.json_format import MessageToDict

    return MessageToDict(
        response, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def _json_default(value: Any) -> Any:
    """numpy scalars/arrays in Milvus rows → plain JSON values."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    raise TypeError(f"cannot encode {type(value).__name__} in hit metadata")
