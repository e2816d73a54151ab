"""One error hierarchy for the whole project, and the table that maps it to gRPC status codes.

Every error a user can cause or meet is a ``TBError`` subclass. ``retriable`` says whether the
same call may succeed later without changes (as in pymilvus). The gRPC server maps errors to
status codes with :data:`GRPC_STATUS` alone; status names are strings here so that this module
imports nothing heavy (``grpc.StatusCode[name]`` resolves them at the wire).
"""

from __future__ import annotations

__all__ = [
    "TBError",
    "InvalidInputError",
    "NotFoundError",
    "AlreadyExistsError",
    "CheckpointError",
    "ModelMismatchError",
    "VideoDecodeError",
    "StoreError",
    "IndexBackendError",
    "RerankerUnavailableError",
    "ResourceExhaustedError",
    "DeadlineExceededError",
    "AuthenticationError",
    "GRPC_STATUS",
    "grpc_status_name",
]


class TBError(Exception):
    """Base class of every tb_reranker error."""

    retriable: bool = False

    def __init__(self, message: str, *, retriable: bool | None = None) -> None:
        super().__init__(message)
        self.message = message
        if retriable is not None:
            self.retriable = retriable


class InvalidInputError(TBError, ValueError):
    """The caller passed something malformed: empty text, wrong shape, NaN, bad id, limit ≤ 0."""


class NotFoundError(TBError, KeyError):
    """A named thing (collection, video id, checkpoint directory) does not exist."""

    def __str__(self) -> str:  # KeyError would quote the message
        return self.message


class AlreadyExistsError(TBError):
    """Creating something that exists already (and the caller did not ask to replace it)."""


class CheckpointError(TBError):
    """A checkpoint on disk is missing files, tampered with, or does not match its config."""


class ModelMismatchError(TBError):
    """Stored vectors were made by another model than the one loaded (fingerprints differ)."""


class VideoDecodeError(TBError):
    """A video file cannot be decoded (corrupt, truncated, no video stream, zero frames)."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"cannot decode video {path!s}: {reason}")
        self.path = str(path)
        self.reason = reason


class StoreError(TBError):
    """The frame-token store failed to read or write (I/O, corruption, backend down)."""


class IndexBackendError(TBError):
    """Milvus failed or is unreachable. Retriable by default: the server may come back."""

    retriable = True


class RerankerUnavailableError(TBError):
    """The remote reranker sidecar cannot be reached."""

    retriable = True


class ResourceExhaustedError(TBError):
    """The server is at its concurrency limit and shed this call; try again later."""

    retriable = True


class DeadlineExceededError(TBError):
    """The call ran past its deadline."""

    retriable = True


class AuthenticationError(TBError):
    """Missing or wrong credentials."""


class DataCorruptionError(StoreError):
    """Stored data is damaged (unreadable entry, NaN/inf tokens, a broken store page): the
    server's fault, not the caller's, and not retriable; ``tb check --repair`` fixes it."""


__all__ += ["DataCorruptionError"]


# One table: error type -> gRPC status code name. Order matters only for subclasses
# (the first match in the MRO wins, see grpc_status_name).
GRPC_STATUS: dict[type[BaseException], str] = {
    InvalidInputError: "INVALID_ARGUMENT",
    NotFoundError: "NOT_FOUND",
    AlreadyExistsError: "ALREADY_EXISTS",
    CheckpointError: "FAILED_PRECONDITION",
    ModelMismatchError: "FAILED_PRECONDITION",
    VideoDecodeError: "INVALID_ARGUMENT",
    StoreError: "UNAVAILABLE",
    IndexBackendError: "UNAVAILABLE",
    RerankerUnavailableError: "UNAVAILABLE",
    ResourceExhaustedError: "RESOURCE_EXHAUSTED",
    DeadlineExceededError: "DEADLINE_EXCEEDED",
    AuthenticationError: "UNAUTHENTICATED",
}

GRPC_STATUS[DataCorruptionError] = "DATA_LOSS"  # found before StoreError: MRO order


def grpc_status_name(exc: BaseException) -> str:
    """The gRPC status code name for ``exc``; ``INTERNAL`` for anything not in the table."""
    for klass in type(exc).__mro__:
        if klass in GRPC_STATUS:
            return GRPC_STATUS[klass]
    return "INTERNAL"
