"""Conversions between numpy / result dataclasses and the ``tb_reranker.v1`` messages.

Shared by the servicers and the remote client so both ends agree on one encoding.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

from tb_reranker._pb.tb_reranker.v1 import reranker_pb2 as pb
from tb_reranker.errors import InvalidInputError
from tb_reranker.types import Hit

__all__ = [
    "tensor_to_proto",
    "tensor_from_proto",
    "metadata_to_proto",
    "metadata_from_proto",
    "hit_to_proto",
    "hit_from_proto",
]

_DTYPE = np.dtype("<f4")
_TIMING_FIELDS = ("queue_ns", "encode_ns", "fetch_ns", "fusion_ns", "total_ns")


def tensor_to_proto(array: Any) -> pb.FloatTensor:
    """Any array-like → ``FloatTensor`` (packed little-endian float32, row-major)."""
    values = np.ascontiguousarray(np.asarray(array, dtype=_DTYPE))
    return pb.FloatTensor(shape=list(values.shape), data=values.tobytes())


def tensor_from_proto(message: pb.FloatTensor, *, name: str = "tensor") -> np.ndarray:
    """``FloatTensor`` → float32 array; a size/shape disagreement is ``InvalidInputError``."""
    shape = tuple(int(s) for s in message.shape)
    if not shape:
        raise InvalidInputError(f"{name} has no shape")
    expected = math.prod(shape) * _DTYPE.itemsize
    if len(message.data) != expected:
        raise InvalidInputError(
            f"{name} has shape {list(shape)} ({expected} bytes of float32) "
            f"but carries {len(message.data)} bytes"
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


def hit_to_proto(hit: Hit) -> pb.SearchHit:
    message = pb.SearchHit(
        id=hit.id,
        score=hit.score,
        broad_score=hit.broad_score,
        delta=hit.delta,
        rank=hit.rank,
        reranked=hit.reranked,
        broad_rank=hit.broad_rank,
        metadata_json=json.dumps(hit.metadata, default=_json_default, allow_nan=False),
    )
    if hit.best_frame_s is not None:
        message.best_frame_s = hit.best_frame_s
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
