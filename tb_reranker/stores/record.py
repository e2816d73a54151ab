"""The frame record: one video's frame tokens ``[T, D]`` + timestamps, its bytes, and its id rule.

One record = the bytes of a safetensors file (``safetensors.numpy.save``) holding ``tokens``
and ``timestamps`` (and ``mask``), with the content hash, source uri, duration, model
fingerprint and user metadata in the safetensors metadata. No pickle anywhere. Every backend
(:mod:`~tb_reranker.stores.lmdb_store`, :mod:`~tb_reranker.stores.s3_store`) stores exactly
these bytes.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from tb_reranker.errors import DataCorruptionError, InvalidInputError

__all__ = [
    "FrameRecord",
    "validate_video_id",
    "validate_video_ids",
    "validate_record_key",
    "validate_record_keys",
    "segment_key",
    "split_key",
    "MAX_SEGMENTS",
    "encode_record",
    "decode_record",
    "all_finite",
    "VIDEO_ID_PATTERN",
]

VIDEO_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,254}$")
KEY_SEPARATOR = "~"  # never in a video id: "<video id>~<n>" is segment n >= 1 of that video
MAX_SEGMENTS = 100_000  # segments per video at most: keys "~1" .. "~99999"
_SEGMENT_SUFFIX = re.compile(r"[1-9][0-9]{0,4}")  # 1..99999, no leading zero (one key per n)
_HASH_KEY = "content_hash"
_FORMAT_KEY = "tb_format"
_FORMAT = "frame_record/1"


def validate_video_id(video_id: Any) -> str:
    """Return ``video_id`` if it is a safe id, else raise :class:`InvalidInputError`.

    Safe: 1-255 characters of ``[A-Za-z0-9._:-]``, starting with a letter or digit, no ``..``.
    Such an id can never name a path outside the store (no ``/``, ``\\``, NUL, or ``..``).
    """
    if not isinstance(video_id, str):
        raise InvalidInputError(f"video id must be a string, got {type(video_id).__name__}")
    if not VIDEO_ID_PATTERN.fullmatch(video_id) or ".." in video_id:
        shown = video_id if len(video_id) <= 80 else video_id[:77] + "..."
        raise InvalidInputError(
            f"invalid video id {shown!r}: use 1-255 characters of letters, digits and ._:- "
            "starting with a letter or digit, without '..'"
        )
    return video_id


def validate_video_ids(ids: Iterable[str]) -> list[str]:
    """``ids`` as a list, each checked by :func:`validate_video_id` (a lone string is refused)."""
    if isinstance(ids, str):
        raise InvalidInputError("pass a list of video ids, not a single string")
    return [validate_video_id(i) for i in ids]


def segment_key(video_id: str, segment: int) -> str:
    """The key of segment ``segment`` (0-based, in time order) of ``video_id``: the video id
    itself for segment 0 (a one-segment video is keyed as before segments existed), else
    ``"<video id>~<segment>"``. Raises :class:`InvalidInputError` for a bad id or number."""
    validate_video_id(video_id)
    if isinstance(segment, bool) or not isinstance(segment, int | np.integer):
        raise InvalidInputError(f"segment must be an int, got {type(segment).__name__}")
    if not 0 <= int(segment) < MAX_SEGMENTS:
        raise InvalidInputError(f"segment must be in [0, {MAX_SEGMENTS - 1}], got {segment}")
    return video_id if segment == 0 else f"{video_id}{KEY_SEPARATOR}{int(segment)}"


def split_key(key: str) -> tuple[str, int]:
    """``(video id, segment)`` of a record key (the inverse of :func:`segment_key`); a key
    without ``~`` is segment 0 of the video of that id. Raises :class:`InvalidInputError` for
    anything :func:`validate_record_key` refuses."""
    validate_record_key(key)
    video_id, separator, number = key.partition(KEY_SEPARATOR)
    return video_id, int(number) if separator else 0


def validate_record_key(key: Any) -> str:
    """Return ``key`` if it names a record (a frame-store entry, a Milvus row): a video id
    (:func:`validate_video_id`), optionally followed by ``~n`` with ``1 <= n <= 99999`` written
    without leading zeros; else raise :class:`InvalidInputError`."""
    if not isinstance(key, str):
        raise InvalidInputError(f"record key must be a string, got {type(key).__name__}")
    video_id, separator, number = key.partition(KEY_SEPARATOR)
    if separator and not _SEGMENT_SUFFIX.fullmatch(number):
        shown = key if len(key) <= 80 else key[:77] + "..."
        raise InvalidInputError(
            f"invalid record key {shown!r}: a video id, optionally followed by '~n' "
            f"(n in 1..{MAX_SEGMENTS - 1}, no leading zero)"
        )
    validate_video_id(video_id)
    return key


def validate_record_keys(keys: Iterable[str]) -> list[str]:
    """``keys`` as a list, each checked by :func:`validate_record_key` (a lone string is
    refused)."""
    if isinstance(keys, str):
        raise InvalidInputError("pass a list of record keys, not a single string")
    return [validate_record_key(k) for k in keys]


@dataclass(frozen=True)
class FrameRecord:
    """Frame tokens of one segment of a video (plus what is needed to rebuild its Milvus row).

    A video is cut into ``segments`` segments (1: the whole video, as before segments existed);
    this record is segment ``segment`` (0-based), ``[start_s, end_s]`` seconds of the video
    (``end_s`` None: up to ``duration_s``), stored under
    ``segment_key(video_id, segment)``. ``timestamps`` are seconds in the whole file, inside the
    segment; ``content_hash``, ``uri`` and ``duration_s`` are the file's, the same in every
    record of the video.
    """

    tokens: np.ndarray  # float16 (or float32) [T, D] per-frame features ([T·(1+P), D] with patches)
    timestamps: np.ndarray  # float32 [T] seconds of each sampled frame in the video
    content_hash: str  # sha256 hex of the source file the tokens were made from
    mask: np.ndarray | None = None  # bool [T]: False = padded (repeated) frame; None = all real
    uri: str = ""  # where the source video lives (to rebuild the Milvus row in `tb check --repair`)
    duration_s: float = 0.0  # video duration in seconds
    fingerprint: str = ""  # fingerprint of the model that made the tokens ("" = unknown)
    metadata: dict[str, Any] | None = None  # user metadata (JSON-serialisable) of the Milvus row
    segment: int = 0  # which segment of the video (0-based, in time order)
    start_s: float = 0.0  # where the segment starts in the video, seconds
    end_s: float | None = None  # where it ends (None: the whole video, = duration_s)
    segments: int = 1  # how many segments the video has (every record of it carries this)

    def __post_init__(self) -> None:
        if not isinstance(self.tokens, np.ndarray) or self.tokens.ndim != 2:
            raise InvalidInputError(
                "FrameRecord.tokens must be a 2-D array [T, D], got "
                f"{getattr(self.tokens, 'shape', type(self.tokens))}"
            )
        if self.tokens.dtype not in (np.float16, np.float32):
            raise InvalidInputError(
                f"FrameRecord.tokens dtype {self.tokens.dtype}: use float16 or float32"
            )
        if (
            not isinstance(self.timestamps, np.ndarray)
            or self.timestamps.ndim != 1
            or self.timestamps.shape[0] == 0
            or self.tokens.shape[0] % self.timestamps.shape[0] != 0
        ):
            raise InvalidInputError(
                f"FrameRecord.timestamps must have shape [T] with T dividing the {self.tokens.shape[0]} "
                f"token rows, got {getattr(self.timestamps, 'shape', type(self.timestamps))}"
            )
        if self.mask is not None and (
            not isinstance(self.mask, np.ndarray) or self.mask.shape != self.timestamps.shape
        ):
            raise InvalidInputError(
                f"FrameRecord.mask must have shape {list(self.timestamps.shape)}, "
                f"got {getattr(self.mask, 'shape', type(self.mask))}"
            )
        if not isinstance(self.content_hash, str):
            raise InvalidInputError("FrameRecord.content_hash must be a string")
        self._check_segment()

    def _check_segment(self) -> None:
        for name in ("segment", "segments"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | np.integer):
                raise InvalidInputError(f"FrameRecord.{name} must be an int, got {value!r}")
        if not 0 <= self.segment < self.segments <= MAX_SEGMENTS:
            raise InvalidInputError(
                f"FrameRecord: segment {self.segment} of {self.segments}: need "
                f"0 <= segment < segments <= {MAX_SEGMENTS}"
            )
        start = self.start_s
        end = self.end_s
        if not (isinstance(start, int | float) and math.isfinite(start) and start >= 0):
            raise InvalidInputError(f"FrameRecord.start_s must be finite and >= 0, got {start!r}")
        if end is not None and not (
            isinstance(end, int | float) and math.isfinite(end) and end >= start
        ):
            raise InvalidInputError(
                f"FrameRecord.end_s must be None or finite and >= start_s {start!r}, got {end!r}"
            )

    @property
    def end(self) -> float:
        """Where the segment ends, seconds (``end_s``, or the video's duration when None)."""
        return float(self.duration_s) if self.end_s is None else float(self.end_s)

    @property
    def num_frames(self) -> int:
        """T, sampled frames (real + padded)."""
        return int(self.timestamps.shape[0])

    @property
    def num_real_frames(self) -> int:
        return self.num_frames if self.mask is None else int(np.count_nonzero(self.mask))

    def frames_cls(self) -> np.ndarray:
        """Per-frame features float32 [T, D] (row 0 of each frame's token group)."""
        tokens = np.asarray(self.tokens, dtype=np.float32)
        per_frame = tokens.shape[0] // self.num_frames
        return tokens.reshape(self.num_frames, per_frame, -1)[:, 0]

    def video_cls(self) -> np.ndarray:
        """The video [CLS] float32 [D]: L2-normalised mean of the real frames' features.

        The same definition as ``TokenBinder.pool_cls`` (checked by the tests), so a Milvus row
        can be rebuilt from the store alone (up to the store's float16 rounding).
        """
        frames = self.frames_cls()
        if self.mask is not None and self.mask.any():
            frames = frames[self.mask.astype(bool)]
        pooled = frames.mean(axis=0)
        norm = float(np.linalg.norm(pooled))
        return pooled / max(norm, 1e-12)


def encode_record(record: FrameRecord, dtype: np.dtype | type = np.float16) -> bytes:
    """safetensors bytes of ``record``, tokens cast to ``dtype``."""
    from safetensors.numpy import save

    with np.errstate(over="ignore"):  # overflow to inf is refused just below
        tokens = np.ascontiguousarray(record.tokens, dtype=dtype)
    if not np.isfinite(tokens).all():
        raise InvalidInputError("frame tokens contain NaN/inf (or overflow float16)")
    tensors = {
        "tokens": tokens,
        "timestamps": np.ascontiguousarray(record.timestamps, dtype=np.float32),
    }
    if record.mask is not None:
        tensors["mask"] = np.ascontiguousarray(record.mask, dtype=np.uint8)
    metadata = {
        _HASH_KEY: record.content_hash,
        _FORMAT_KEY: _FORMAT,
        "uri": record.uri,
        "duration_s": repr(float(record.duration_s)),
        "fingerprint": record.fingerprint,
    }
    if (record.segment, record.segments, record.start_s, record.end_s) != (0, 1, 0.0, None):
        # written only for a part of a video: a whole-video record keeps today's bytes
        metadata.update(
            segment=str(int(record.segment)),
            segments=str(int(record.segments)),
            start_s=repr(float(record.start_s)),
            end_s=repr(float(record.end)),
        )
    if record.metadata:
        try:
            metadata["metadata"] = json.dumps(record.metadata, sort_keys=True)
        except (TypeError, ValueError) as exc:
            raise InvalidInputError(f"metadata is not JSON-serialisable: {exc}") from exc
    return save(tensors, metadata=metadata)


_DTYPES = {"F16": np.float16, "F32": np.float32, "U8": np.uint8}


def _tensor(header: dict[str, Any], name: str, data: Any, base: int) -> np.ndarray:
    """One tensor of a safetensors buffer, bounds- and size-checked, copied out (writable)."""
    info = header[name]
    dtype = np.dtype(_DTYPES[info["dtype"]])
    shape = [int(d) for d in info["shape"]]
    begin, end = (int(v) for v in info["data_offsets"])
    count = math.prod(shape)
    if min(shape, default=0) < 0 or not 0 <= begin <= end <= len(data) - base:
        raise ValueError(f"tensor {name!r} lies outside the buffer")
    if end - begin != count * dtype.itemsize:
        raise ValueError(f"tensor {name!r} has {end - begin} bytes for shape {shape}")
    return np.frombuffer(data, dtype=dtype, count=count, offset=base + begin).reshape(shape).copy()


def all_finite(values: np.ndarray) -> bool:
    """``np.isfinite(values).all()``; for float16 read from the bits (an exponent field of all
    ones is inf or NaN), ≈ 4x faster than numpy's half-precision isfinite (issue 12: every
    candidate's tokens are checked on every cold rerank)."""
    if values.dtype == np.float16:
        if values.size == 0:
            return True
        magnitudes = values.view(np.uint16) & 0x7FFF  # the sign bit cleared
        return int(magnitudes.max()) < 0x7C00
    return bool(np.isfinite(values).all())


def decode_record(video_id: str, data: bytes | memoryview) -> FrameRecord:
    """Parse safetensors bytes; any problem is a :class:`DataCorruptionError` naming
    ``video_id`` (unparsable bytes, or tokens/timestamps that are not finite: encode_record never
    writes those, so they can only come from damage on disk).

    The header is parsed directly (the safetensors format: u64 little-endian header length,
    JSON header, raw little-endian tensor bytes) so a read costs a few microseconds.
    """
    try:
        if len(data) < 8:
            raise ValueError("truncated header")
        (header_len,) = struct.unpack("<Q", bytes(data[:8]))
        if header_len > len(data) - 8:
            raise ValueError("header length past the end")
        header = json.loads(bytes(data[8 : 8 + header_len]))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        metadata = header.get("__metadata__") or {}
        if metadata.get(_FORMAT_KEY) != _FORMAT:
            raise ValueError(f"unknown format {metadata.get(_FORMAT_KEY)!r}")
        base = 8 + header_len
        mask = _tensor(header, "mask", data, base).astype(bool) if "mask" in header else None
        user = json.loads(metadata["metadata"]) if metadata.get("metadata") else None
        record = FrameRecord(
            tokens=_tensor(header, "tokens", data, base),
            timestamps=_tensor(header, "timestamps", data, base),
            content_hash=str(metadata.get(_HASH_KEY, "")),
            mask=mask,
            uri=str(metadata.get("uri", "")),
            duration_s=float(metadata.get("duration_s", "0") or 0.0),
            fingerprint=str(metadata.get("fingerprint", "")),
            metadata=user,
            # records written before segments: segment 0 of 1, the whole video
            segment=int(metadata.get("segment", "0")),
            start_s=float(metadata.get("start_s", "0")),
            end_s=float(metadata["end_s"]) if "end_s" in metadata else None,
            segments=int(metadata.get("segments", "1")),
        )
        if not all_finite(record.tokens):
            raise ValueError("frame tokens contain NaN/inf")
        if not all_finite(record.timestamps):
            raise ValueError("timestamps contain NaN/inf")
    except Exception as exc:  # noqa: BLE001 - any parse failure means a corrupt entry
        raise DataCorruptionError(
            f"corrupt frame-token entry for video {video_id!r}: {exc} "
            "(run `tb check --repair`, then re-ingest it)"
        ) from exc
    return record
