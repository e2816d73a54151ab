"""One error hierarchy for the whole project.

Every error a user can cause or meet is a ``TBError`` subclass. ``retriable`` says whether the
same call may succeed later without changes (as in pymilvus). The tables that map these types to
gRPC and HTTP statuses (and back) are ``tb_reranker.wire.status``.
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
    "IndexUnavailableError",
    "IndexBackendError",
    "BulkImportError",
    "RerankerUnavailableError",
    "ResourceExhaustedError",
    "DeadlineExceededError",
    "AuthenticationError",
    "DataCorruptionError",
    "printable",
]


def printable(text: object) -> str:
    """``text`` for a one-line message: as it is when every character prints, else its
    ``repr`` (a newline, a control character or an undecodable byte of a file name is escaped,
    so it can neither split the line nor fail to print)."""
    text = str(text)
    return text if text.isprintable() else repr(text)


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
        super().__init__(f"cannot decode video {printable(path)}: {reason}")
        self.path = str(path)
        self.reason = reason


class StoreError(TBError):
    """The frame-token store failed to read or write (I/O, corruption, backend down)."""


class IndexUnavailableError(TBError):
    """Milvus failed or is unreachable. Retriable by default: the server may come back."""

    retriable = True


# Deprecated name of IndexUnavailableError (the same class: ``except IndexBackendError`` and
# a sidecar that names it in its error trailer keep working)
IndexBackendError = IndexUnavailableError


class BulkImportError(IndexUnavailableError):
    """Milvus rejected a bulk import (a job failed: a file of the wrong dimension, unreadable or
    missing) or its rows did not show up; the collection was left as it was. Not retriable:
    the same files fail again (a timeout says ``retriable=True``)."""

    retriable = False


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
