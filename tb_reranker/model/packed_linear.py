"""Inference-time float32 linear layers on oneDNN's pre-packed weights (CPU only).

At query time every linear layer of the text tower and of the fusion sees a handful of rows
(one query: the ~20 positions of a truncated text, the 3 fused indicators, the K candidates),
so the matrix product is bound by reading the weights from memory, not by arithmetic.
oneDNN's ``_linear_pointwise`` on a weight reordered once into its blocked layout reads it
1.2-2.8x faster than the BLAS call behind ``F.linear`` on the row-major weight (measured on
this project's 2-core AMD EPYC: ``benchmarks/text_encode.py``, ``benchmarks/rerank_cost.py``).
It is the same float32 product (different summation order: equal to float rounding).

:func:`linear` is ``F.linear`` with that fast path taken only where it changes nothing else:
CPU, float32 input and weight, no autocast, no gradient needed (inference, or weights and input
without ``requires_grad``), and a weight that tracks its version (not one created under
``torch.inference_mode``). The packed copy of a weight is made on first use and kept
until the weight changes (its version counter or storage) or dies; it costs as much memory as
the weight itself. ``TB_PACKED_LINEAR=0`` (read at first use) or :func:`set_enabled` turns the
fast path off; it is also off where torch lacks oneDNN.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["linear", "dense", "sequential", "applies", "enabled", "set_enabled", "packed_bytes"]

log = logging.getLogger(__name__)


@dataclass
class _Entry:
    weight: weakref.ref[torch.Tensor]  # the dense weight this was packed from
    key: tuple[int, int]  # (version counter, data pointer) when packed
    packed: torch.Tensor  # oneDNN blocked layout, [out, in] logically


_entries: dict[int, _Entry] = {}  # id(weight) -> entry; dropped when the weight dies
_lock = threading.Lock()
_state: dict[str, bool | None] = {"enabled": None, "available": None}


def _available() -> bool:
    """Whether this torch has oneDNN's packed linear (probed once, on a tiny product)."""
    available = _state["available"]
    if available is None:
        available = False
        if torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise"):
            try:
                weight, x = torch.ones(2, 3), torch.ones(1, 3)
                packed = torch.ops.mkldnn._reorder_linear_weight(weight, None)
                out = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
                available = bool(torch.equal(out, F.linear(x, weight)))
            except (RuntimeError, NotImplementedError) as exc:  # a build without the kernels
                log.debug("oneDNN packed linear unavailable: %s", exc)
        _state["available"] = available
    return bool(available)


def enabled() -> bool:
    """Whether :func:`linear` may take the packed path (``TB_PACKED_LINEAR``, :func:`set_enabled`)."""
    value = _state["enabled"]
    if value is None:
        value = os.environ.get("TB_PACKED_LINEAR", "1").strip().lower() not in ("0", "false", "no")
        _state["enabled"] = value
    return bool(value) and _available()


def set_enabled(value: bool) -> bool:
    """Turn the packed path on or off for the whole process; returns the previous setting."""
    enabled()  # resolves the environment's setting first
    previous = bool(_state["enabled"])
    _state["enabled"] = bool(value)
    return previous


def packed_bytes() -> int:
    """Memory held by the packed copies of live weights (bytes)."""
    with _lock:
        entries = list(_entries.values())
    return sum(
        e.packed.numel() * e.packed.element_size() for e in entries if e.weight() is not None
    )


def _forget(weight_id: int) -> None:
    with _lock:
        _entries.pop(weight_id, None)


def _packed(weight: torch.Tensor) -> torch.Tensor:
    key = (weight._version, weight.data_ptr())
    entry = _entries.get(id(weight))
    if entry is not None and entry.weight() is weight and entry.key == key:
        return entry.packed
    packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)
    with _lock:
        known = _entries.get(id(weight))
        if known is None or known.weight() is not weight:
            weakref.finalize(weight, _forget, id(weight))
        _entries[id(weight)] = _Entry(weakref.ref(weight), key, packed)
    return packed


def applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether :func:`linear` of ``x`` by ``weight`` takes the packed path now."""
    return (
        x.device.type == "cpu"
        and weight.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and not (torch.is_grad_enabled() and (weight.requires_grad or x.requires_grad))
        and not weight.is_inference()  # no version counter: an in-place change would go unseen
        and not torch.is_autocast_enabled("cpu")
        and enabled()
    )


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``: x [..., in], weight [out, in], bias [out] -> [..., out]."""
    if not applies(x, weight):
        return F.linear(x, weight, bias)
    if bias is not None and (bias.dtype != torch.float32 or bias.device.type != "cpu"):
        return F.linear(x, weight, bias)
    packed = _packed(weight)
    bias_value = None if bias is None else bias.detach()
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias_value, "none", [], "")


def dense(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)`` through :func:`linear`."""
    return linear(x, layer.weight, layer.bias)


def sequential(layers: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """``layers(x)`` with every ``nn.Linear`` through :func:`linear` (the others called as they
    are: activations, norms)."""
    for layer in layers:
        x = dense(layer, x) if isinstance(layer, nn.Linear) else layer(x)
    return x
