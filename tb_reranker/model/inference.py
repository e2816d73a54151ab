"""A TokenBinder prepared for search and serving, and when its identity is computed.

:func:`tb_reranker.model.identity.identities` hashes the config and the bytes of every state
tensor: the whole-model, vision and query-side fingerprints. A model as built or loaded
(training, plain use) computes them from its weights on every call and holds nothing else
derived from them: whatever changes
its weights (``p.data`` writes, ``load_state_dict``, an optimizer step,
``vector_to_parameters``, ``.to(dtype)``), the next call sees it.

:func:`prepare` (``TokenBinder.prepare_for_inference()``; ``load_checkpoint(inference=True)``
at the load for search and serving) turns a model, in place and once, into an inference model:

* eval mode; with packing on (:func:`packed_linear.enabled`), the text tower's plain blocks
  become :class:`fast_text.PackedResidualBlock` and the fusion's linear layers
  :class:`packed_linear.PackedLinear` (the only way to get packed weights: they pack while the
  model is on CPU in float32, and run ``F.linear`` on the same weights elsewhere);
* every Parameter becomes a buffer holding its own copy of the weight: the model has no
  parameters, so nothing that goes through ``parameters()`` (an optimizer, ``p.data``,
  ``vector_to_parameters``) can change it, and no tensor the caller held before reaches it;
* its identity is computed once and kept. It is computed again, by construction, when the weights
  are replaced: ``load_state_dict`` on the model or any submodule (a hook on every module), or
  any ``.to()``/``.half()``/``.float()`` (it replaces the tensors, which the check at each read
  sees: a comparison of the held tensors' identities, ≈ 76 µs on ViT-B/32, never a hash). The
  packed layers re-pack in the same events.

``prepare(model, vision=False)`` (the sidecar: ``tb serve`` never encodes a video, it reads frame
tokens from the store) also empties the vision tower's tensors once the identity is computed: the
fingerprints stay those of the whole checkpoint, the memory of the tower is given back (≈ 350 MB
of float32 on ViT-B/32), and anything that would need the tower again (``encode_frames``, a
``load_state_dict`` that asks for a new identity, saving it) is a ``CheckpointError``.

What is out of reach: writing into a prepared model's buffers directly (``buffer.data.copy_``):
they are the frozen weights of an inference model, not parameters; change them through
``load_state_dict`` or prepare a model again.
"""

from __future__ import annotations

import logging
import operator
import threading
from itertools import chain
from typing import Any, TypeVar

from torch import nn

from tb_reranker.errors import CheckpointError
from tb_reranker.model import fast_text, packed_linear
from tb_reranker.model.identity import Identities, identities

__all__ = ["prepare", "InferenceState", "WITHOUT_VISION"]

log = logging.getLogger(__name__)

# a TokenBinder (annotated as a module: this file never imports the class that imports it)
Model = TypeVar("Model", bound=nn.Module)


class _Held:
    """Every module's parameter, buffer and child tables, and the objects they hold now."""

    def __init__(self, model: nn.Module) -> None:
        self.tables: list[dict[str, Any]] = [
            table
            for module in model.modules()
            for table in (module._parameters, module._buffers, module._modules)
        ]
        self.lengths = list(map(len, self.tables))
        self.values = list(chain.from_iterable(map(dict.values, self.tables)))

    def unchanged(self) -> bool:
        """Whether every table still holds the very objects it held (identity, not content):
        C-level loops, ≈ 0.1 µs per table."""
        return list(map(len, self.tables)) == self.lengths and all(
            map(operator.is_, chain.from_iterable(map(dict.values, self.tables)), self.values)
        )


class InferenceState:
    """What a prepared model holds: its identity, computed once and again only when its tensors
    are replaced or loaded (see the module docstring)."""

    def __init__(self, model: nn.Module) -> None:
        self.packed = packed_linear.enabled()  # decided once, at preparation
        self.vision = True  # False once drop_vision emptied the vision tower
        self._lock = threading.Lock()
        self._held: _Held | None = None
        self._value: Identities | None = None
        self.refresh(model)

    def __getstate__(self) -> dict[str, Any]:  # copy / pickle: a lock is neither
        state = self.__dict__.copy()
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def invalidate(self, *_: Any) -> None:
        """Forget the identity (a ``load_state_dict`` post-hook of every module)."""
        self._value = None

    def refresh(self, model: nn.Module) -> Identities:
        """Convert and freeze what is not (a layer put in since), then hash the weights."""
        with self._lock:
            if not self.vision:
                raise CheckpointError(WITHOUT_VISION)
            if self.packed:  # the layers pack where they run on CPU in float32
                fast_text.swap_blocks(model.text.transformer)
                packed_linear.replace_linear(model.fusion)
            _freeze(model, self)
            self._held = _Held(model)
            self._value = value = identities(model)
        return value

    def drop_vision(self, model: nn.Module) -> None:
        """Empty every tensor of the vision tower, keeping the identity computed with it."""
        self.refresh(model)
        with self._lock:
            for module in model.clip.visual.modules():
                for name, tensor in list(module._buffers.items()):
                    if tensor is not None:
                        module._buffers[name] = tensor.new_empty(0)
            self.vision = False
            self._held = _Held(model)
        _give_back_freed_memory()

    def identities(self, model: nn.Module) -> Identities:
        value = self._value
        held = self._held
        if value is None or held is None or not held.unchanged():
            value = self.refresh(model)
        return value


def _freeze(model: nn.Module, state: InferenceState) -> None:
    """Every Parameter becomes a buffer holding a copy of it; every module gets the hook that
    makes ``load_state_dict`` (of it or of a parent) forget the identity."""
    for module in model.modules():
        for name, parameter in list(module._parameters.items()):
            if parameter is None:
                continue
            del module._parameters[name]
            module.register_buffer(name, parameter.detach().clone())
        hooks = module._load_state_dict_post_hooks.values()
        if not any(getattr(hook, "__self__", None) is state for hook in hooks):
            module.register_load_state_dict_post_hook(state.invalidate)


def _give_back_freed_memory() -> None:
    """Return freed heap pages to the system (glibc keeps them after large frees: its mmap
    threshold grows with the first large free, so later tensors live in the heap)."""
    import contextlib
    import ctypes
    import sys

    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):  # not glibc (musl): nothing to trim
            ctypes.CDLL("libc.so.6").malloc_trim(0)


WITHOUT_VISION = (
    "this model was loaded for serving without its vision tower (its weights are not in memory):"
    " load the checkpoint again, e.g. load_checkpoint(path), to encode videos or change weights"
)


def prepare(model: Model, *, vision: bool = True) -> Model:
    """Make ``model`` an inference model, in place (see the module docstring); returns it.
    Preparing a prepared model again only drops its vision tower, when ``vision=False``."""
    if not model.prepared:
        model.eval()
        model._inference = InferenceState(model)
        _give_back_freed_memory()  # the parameters the frozen copies replaced
        log.debug(
            "prepared for inference: %d packed layers, %.1f MB packed",
            sum(isinstance(m, packed_linear.Repacking) for m in model.modules()),
            packed_linear.packed_bytes(model) / 1e6,
        )
    if not vision and model._inference.vision:
        model._inference.drop_vision(model)
        log.debug("vision tower dropped (serving): its identity is kept")
    return model
