"""Errors on the wire: the ``tb_reranker.errors`` type ↔ gRPC status (and HTTP status) tables.

The server maps a raised ``TBError`` to a status with :data:`GRPC_STATUS` (via
:func:`grpc_status_name`) and names its class in the :data:`ERROR_TYPE_KEY` trailer; the remote
SDK turns the class name back into the type with :func:`named_error`, or, for a status the
transport raised itself, uses :data:`STATUS_ERRORS`. The HTTP provider endpoints answer with
:data:`HTTP_STATUS` of the same status name. Status codes are names (strings) so that this
module imports nothing heavy; ``grpc.StatusCode[name]`` resolves them at the wire.
"""

from __future__ import annotations

from tb_reranker import errors as e

__all__ = [
    "ERROR_TYPE_KEY",
    "GRPC_STATUS",
    "STATUS_ERRORS",
    "HTTP_STATUS",
    "grpc_status_name",
    "named_error",
    "wire_error_name",
]

ERROR_TYPE_KEY = "tb-error-type"  # trailing metadata: the TBError class name behind a status

# One table: error type -> gRPC status code name. Order matters only for subclasses
# (the first match in the MRO wins, see grpc_status_name).
GRPC_STATUS: dict[type[BaseException], str] = {
    e.InvalidInputError: "INVALID_ARGUMENT",
    e.NotFoundError: "NOT_FOUND",
    e.AlreadyExistsError: "ALREADY_EXISTS",
    e.CheckpointError: "FAILED_PRECONDITION",
    e.ModelMismatchError: "FAILED_PRECONDITION",
    e.VideoDecodeError: "INVALID_ARGUMENT",
    e.DataCorruptionError: "DATA_LOSS",  # before StoreError: the MRO's first match wins
    e.StoreError: "UNAVAILABLE",
    e.IndexUnavailableError: "UNAVAILABLE",
    e.RerankerUnavailableError: "UNAVAILABLE",
    e.ResourceExhaustedError: "RESOURCE_EXHAUSTED",
    e.DeadlineExceededError: "DEADLINE_EXCEEDED",
    e.AuthenticationError: "UNAUTHENTICATED",
}

# status code name -> error type when the server named none (transport-level failures)
STATUS_ERRORS: dict[str, type[e.TBError]] = {
    "INVALID_ARGUMENT": e.InvalidInputError,
    "OUT_OF_RANGE": e.InvalidInputError,
    "NOT_FOUND": e.NotFoundError,
    "UNAVAILABLE": e.RerankerUnavailableError,
    "RESOURCE_EXHAUSTED": e.ResourceExhaustedError,
    "DEADLINE_EXCEEDED": e.DeadlineExceededError,
    "UNAUTHENTICATED": e.AuthenticationError,
    "PERMISSION_DENIED": e.AuthenticationError,
}

# status code name -> HTTP status of the provider endpoints (anything else: 500)
HTTP_STATUS: dict[str, int] = {
    "INVALID_ARGUMENT": 400,
    "UNAUTHENTICATED": 401,
    "NOT_FOUND": 404,
    "FAILED_PRECONDITION": 412,
    "RESOURCE_EXHAUSTED": 429,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
}


def grpc_status_name(exc: BaseException) -> str:
    """The gRPC status code name for ``exc``; ``INTERNAL`` for anything not in the table."""
    for klass in type(exc).__mro__:
        if klass in GRPC_STATUS:
            return GRPC_STATUS[klass]
    return "INTERNAL"


# the names older SDKs know, for errors renamed since: the trailer keeps the old spelling (every
# SDK resolves it to the same class through its alias) so an older client still raises the
# specific error instead of the status's generic one
_WIRE_NAMES: dict[type[BaseException], str] = {e.IndexUnavailableError: "IndexBackendError"}


def wire_error_name(exc: BaseException) -> str:
    """The class name the server puts in the :data:`ERROR_TYPE_KEY` trailer for ``exc``."""
    return _WIRE_NAMES.get(type(exc), type(exc).__name__)


def named_error(type_name: str) -> type[e.TBError] | None:
    """The ``TBError`` class a server named in the trailer, if it is one the SDK can raise."""
    named = getattr(e, str(type_name), None)
    if (
        isinstance(named, type)
        and issubclass(named, e.TBError)
        and named is not e.VideoDecodeError  # (path, reason) constructor
    ):
        return named
    return None
