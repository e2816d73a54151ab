"""Where the model runs and in which precision: the one resolver of the library, server and CLI.

``device``: ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...
``precision`` (the ``--dtype`` of ``tb serve``): ``"auto"`` (bfloat16 autocast on CUDA, none
elsewhere), ``"float32"`` (no autocast anywhere) or ``"bfloat16"`` (autocast on any device,
CPU included). Weights and outputs stay float32; the precision only decides the autocast.
"""

from __future__ import annotations

import torch

from tb_reranker.errors import InvalidInputError

__all__ = [
    "PRECISIONS",
    "resolve_device",
    "check_precision",
    "resolve_precision",
    "autocast_dtype",
]

PRECISIONS = ("auto", "float32", "bfloat16")


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``None``/``""``/``"auto"`` -> the current CUDA device when available, else CPU.

    An explicit device is checked: ``InvalidInputError`` for a malformed name, a CUDA device on
    a machine without CUDA (or with fewer devices than the index) and an unavailable MPS.
    """
    if device is None or (isinstance(device, str) and device.strip().lower() in ("", "auto")):
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise InvalidInputError(f"invalid device {device!r}: {exc}") from exc
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidInputError(
                f"device {str(resolved)!r} requested but CUDA is not available on this machine "
                "(use device 'cpu' or 'auto')"
            )
        count = torch.cuda.device_count()
        if resolved.index is not None and resolved.index >= count:
            raise InvalidInputError(
                f"device {str(resolved)!r} requested but only {count} CUDA device(s) are visible"
            )
    elif resolved.type == "mps" and not torch.backends.mps.is_available():
        raise InvalidInputError("device 'mps' requested but MPS is not available on this machine")
    return resolved


def check_precision(precision: str) -> str:
    """``precision`` if it is one of :data:`PRECISIONS`, else ``InvalidInputError``."""
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise InvalidInputError(f"dtype must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision


def resolve_precision(precision: str, device: torch.device) -> str:
    """The concrete precision on ``device``: ``"auto"`` -> ``"bfloat16"`` on CUDA, else
    ``"float32"``. ``InvalidInputError`` for an unknown name or bfloat16 on a GPU without it."""
    check_precision(precision)
    if precision == "auto":
        return "bfloat16" if device.type == "cuda" else "float32"
    if precision == "bfloat16" and device.type == "cuda":
        with torch.cuda.device(device):
            supported = torch.cuda.is_bf16_supported()
        if not supported:
            raise InvalidInputError(f"dtype bfloat16 is not supported by {device}: use float32")
    return precision


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The ``torch.autocast`` dtype for a checked ``precision`` on ``device`` (None = no
    autocast). Cheap: called on every model call."""
    if precision == "bfloat16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None
