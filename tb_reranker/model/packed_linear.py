"""Linear layers on oneDNN's pre-packed float32 weights: the layer type an inference model is
prepared with (CPU only).

At query time every linear layer of the text tower and of the fusion sees a handful of rows
(one query: the ~20 positions of a truncated text, the 3 fused indicators, the K candidates),
so the matrix product is bound by reading the weights from memory, not by arithmetic.
oneDNN's ``_linear_pointwise`` on a weight reordered once into its blocked layout reads it
1.2-2.8x faster than the BLAS call behind ``F.linear`` on the row-major weight (measured on
this project's 2-core AMD EPYC: ``benchmarks/text_encode.py``, ``benchmarks/rerank_cost.py``).
It is the same float32 product (different summation order: equal to float rounding).

:class:`PackedLinear` is an ``nn.Linear`` that owns its weight and bias as buffers (never
Parameters: no optimizer, ``vector_to_parameters`` or ``p.data`` write through ``parameters()``
reaches them) and holds the packed copy of its weight. The copy is made when the layer is built
and made again whenever its weights are replaced or rewritten through the module:
``load_state_dict`` (in place), ``.to()``/``.half()``/``.float()`` (any ``_apply``), or a new
tensor assigned to ``weight``. Nothing infers staleness from version counters. Only
:func:`tb_reranker.model.inference.prepare` builds these layers, on a model prepared for search
or serving; a model that trains, or any model not prepared, runs PyTorch's own modules and has
no packed copy that could be stale.

The packed product runs only where it changes nothing else: CPU, float32 input and weight, no
autocast, no gradient asked for the input; otherwise ``F.linear`` on the same weights.
``TB_PACKED_LINEAR=0`` (read at first use) or :func:`set_enabled` makes ``prepare`` leave the
layers as they are; the packed path is also off where torch lacks oneDNN (probed once).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PackedLinear", "Repacking", "replace_linear", "enabled", "set_enabled", "packed_bytes"]

log = logging.getLogger(__name__)

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
    """Whether models prepared now get packed layers (``TB_PACKED_LINEAR``, :func:`set_enabled`,
    and a torch with oneDNN's kernels)."""
    value = _state["enabled"]
    if value is None:
        value = os.environ.get("TB_PACKED_LINEAR", "1").strip().lower() not in ("0", "false", "no")
        _state["enabled"] = value
    return bool(value) and _available()


def set_enabled(value: bool) -> bool:
    """Turn packing on or off for models prepared from now on; returns the previous setting."""
    enabled()  # resolves the environment's setting first
    previous = bool(_state["enabled"])
    _state["enabled"] = bool(value)
    return previous


@dataclass(frozen=True)
class _Pack:
    """The packed copy of one weight, and the dense tensors it was made from."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    packed: torch.Tensor | None  # None: not packable (device, dtype): F.linear runs


def _pack(weight: torch.Tensor, bias: torch.Tensor | None) -> _Pack:
    packable = (
        weight.device.type == "cpu"
        and weight.dtype == torch.float32
        and weight.ndim == 2
        and (bias is None or (bias.device.type == "cpu" and bias.dtype == torch.float32))
        and _available()
    )
    packed = None
    if packable:
        with torch.no_grad():
            packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)
    return _Pack(weight, bias, packed)


def _takes_packed(x: torch.Tensor) -> bool:
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and not (torch.is_grad_enabled() and x.requires_grad)
        and not torch.is_autocast_enabled("cpu")
    )


class Repacking(nn.Module):
    """A module whose linear weights (``PACKED``: pairs of weight and bias buffer names) have
    packed copies, made again whenever the module's tensors are replaced or loaded."""

    PACKED: tuple[tuple[str, str], ...] = ()

    def repack(self) -> None:
        """Pack every weight in ``PACKED`` from the tensors the module holds now."""
        self.__dict__["_packs"] = {
            weight: _pack(self._buffers[weight], self._buffers.get(bias))
            for weight, bias in self.PACKED
        }

    def linear(self, x: torch.Tensor, weight_key: str, bias_key: str) -> torch.Tensor:
        """``F.linear`` of ``x`` by the named weight and bias buffers (a pair of ``PACKED``), on
        the packed copy where it may."""
        weight, bias = self._buffers[weight_key], self._buffers.get(bias_key)
        pack = self.__dict__["_packs"][weight_key]
        if pack.weight is not weight or pack.bias is not bias:  # a new tensor was assigned
            self.repack()
            pack = self.__dict__["_packs"][weight_key]
        if pack.packed is None or not _takes_packed(x):
            return F.linear(x, weight, bias)
        return torch.ops.mkldnn._linear_pointwise(x, pack.packed, bias, "none", [], "")

    def _apply(self, fn: Any, recurse: bool = True) -> Any:
        module = super()._apply(fn, recurse)
        self.repack()
        return module

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self.repack()

    def __getstate__(self) -> dict[str, Any]:  # copy / pickle: the packed copies are rebuilt
        state = self.__dict__.copy()
        state.pop("_packs", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.repack()

    def packed_bytes(self) -> int:
        """Memory held by this module's packed copies (bytes)."""
        packs = self.__dict__.get("_packs", {}).values()
        return sum(
            p.packed.numel() * p.packed.element_size() for p in packs if p.packed is not None
        )


class PackedLinear(Repacking, nn.Linear):
    """``nn.Linear`` on the packed copy of its weight; weight and bias are buffers it owns (the
    same state-dict names as ``nn.Linear``'s, so fingerprints and checkpoints do not change)."""

    PACKED = (("weight", "bias"),)

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        nn.Module.__init__(self)  # not nn.Linear's: it would make Parameters
        self.out_features, self.in_features = (int(n) for n in weight.shape)
        self.register_buffer("weight", weight.detach().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.repack()

    @classmethod
    def from_linear(cls, layer: nn.Linear) -> PackedLinear:
        """A packed copy of ``layer`` (its weights copied: the layer itself is left alone)."""
        return cls(layer.weight, layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x, "weight", "bias")


def replace_linear(module: nn.Module) -> int:
    """Swap every ``nn.Linear`` under ``module`` (not already packed) for a
    :class:`PackedLinear` with its weights, in place; returns how many were swapped."""
    swapped = 0
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear) and not isinstance(child, PackedLinear):
            setattr(module, name, PackedLinear.from_linear(child))
            swapped += 1
        else:
            swapped += replace_linear(child)
    return swapped


def packed_bytes(module: nn.Module) -> int:
    """Memory held by the packed copies under ``module`` (bytes)."""
    return sum(m.packed_bytes() for m in module.modules() if isinstance(m, Repacking))
