"""Training checkpoints without pickle: model via ``save_checkpoint``, the rest in safetensors + JSON.

Layout of one checkpoint, written atomically (temporary directory, then ``os.rename``)::

    <out>/epoch-<n>/
        config.json, ... (whatever ``save_checkpoint`` writes)
        train_state.safetensors   optimizer tensors (``state.<param>.<key>``) and RNG states
        train_state.json          epoch, step, optimizer scalars and param groups, scheduler,
                                  python / numpy RNG, the TrainConfig; written last

A directory ``epoch-<n>`` without a readable ``train_state.json`` naming files that all exist
is *incomplete* (an interrupted writer, a half-copied folder) and is ignored by
:func:`latest_checkpoint`.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from tb_reranker.errors import CheckpointError

__all__ = [
    "STATE_JSON",
    "STATE_TENSORS",
    "epoch_dir",
    "latest_checkpoint",
    "is_complete",
    "write_checkpoint",
    "read_train_state",
    "optimizer_state_to_files",
    "optimizer_state_from_files",
    "rng_state",
    "set_rng_state",
]

log = logging.getLogger(__name__)

STATE_JSON = "train_state.json"
STATE_TENSORS = "train_state.safetensors"
_EPOCH_RE = re.compile(r"^epoch-(\d+)$")
_FORMAT_VERSION = 1


def epoch_dir(out_dir: str | os.PathLike, epoch: int) -> Path:
    """``<out_dir>/epoch-<epoch>`` (epochs count from 1)."""
    return Path(out_dir) / f"epoch-{epoch}"


def is_complete(directory: str | os.PathLike) -> bool:
    """Whether ``directory`` holds a whole checkpoint (state JSON readable, every file present)."""
    directory = Path(directory)
    try:
        meta = json.loads((directory / STATE_JSON).read_text())
    except (OSError, ValueError):
        return False
    files = meta.get("files")
    if not isinstance(files, list) or not files:
        return False
    return all((directory / name).is_file() for name in files)


def latest_checkpoint(out_dir: str | os.PathLike) -> tuple[int, Path] | None:
    """The highest complete ``(epoch, directory)`` under ``out_dir``; ``None`` if there is none."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return None
    found: list[tuple[int, Path]] = []
    for child in out_dir.iterdir():
        match = _EPOCH_RE.match(child.name)
        if match is None or not child.is_dir():
            continue
        if is_complete(child):
            found.append((int(match.group(1)), child))
        else:
            log.warning("ignoring incomplete checkpoint directory %s", child)
    return max(found) if found else None


# ----------------------------------------------------------------------------- optimizer


def optimizer_state_to_files(
    state_dict: dict[str, Any],
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into tensors (for safetensors) and JSON-able scalars."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for param_id, per_param in state_dict["state"].items():
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{param_id}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(param_id), {})[key] = value
    groups = []
    for group in state_dict["param_groups"]:
        groups.append({k: list(v) if isinstance(v, tuple) else v for k, v in group.items()})
    return tensors, {"scalars": scalars, "param_groups": groups}


def optimizer_state_from_files(
    tensors: dict[str, torch.Tensor], meta: dict[str, Any]
) -> dict[str, Any]:
    """Inverse of :func:`optimizer_state_to_files`: a dict for ``optimizer.load_state_dict``."""
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if not name.startswith("state."):
            continue
        _, param_id, key = name.split(".", 2)
        state.setdefault(int(param_id), {})[key] = value
    for param_id, per_param in meta.get("scalars", {}).items():
        state.setdefault(int(param_id), {}).update(per_param)
    groups = []
    for group in meta["param_groups"]:
        group = dict(group)
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
        groups.append(group)
    return {"state": state, "param_groups": groups}


# ----------------------------------------------------------------------------- RNG


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Torch (CPU + CUDA) RNG as tensors; python and numpy RNG as JSON."""
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, value in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = value
    version, internal, gauss = random.getstate()
    numpy_state = np.random.get_state(legacy=False)
    numpy_state["state"] = {
        "key": numpy_state["state"]["key"].tolist(),
        "pos": int(numpy_state["state"]["pos"]),
    }
    meta = {"python": [version, list(internal), gauss], "numpy": numpy_state}
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured (CUDA states only where the devices exist)."""
    if "rng.torch" in tensors:
        torch.set_rng_state(tensors["rng.torch"])
    cuda_states = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
    if cuda_states and torch.cuda.is_available():
        count = min(len(cuda_states), torch.cuda.device_count())
        for i in range(count):
            torch.cuda.set_rng_state(cuda_states[i], i)
    if "python" in meta:
        version, internal, gauss = meta["python"]
        random.setstate((version, tuple(internal), gauss))
    if "numpy" in meta:
        numpy_state = dict(meta["numpy"])
        numpy_state["state"] = {
            "key": np.asarray(numpy_state["state"]["key"], dtype=np.uint32),
            "pos": numpy_state["state"]["pos"],
        }
        np.random.set_state(numpy_state)


# ----------------------------------------------------------------------------- write / read


def write_checkpoint(
    out_dir: str | os.PathLike,
    epoch: int,
    *,
    save_model: Callable[[Path], None],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scalars: dict[str, Any],
) -> Path:
    """Write ``<out_dir>/epoch-<epoch>`` atomically and return it.

    ``save_model(dir)`` writes the model files (``save_checkpoint``); ``scalars`` is JSON-able
    (epoch, global step, the train config, losses, ...). An existing *incomplete* directory of
    the same name is moved out of the way; an existing complete one raises ``CheckpointError``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    final = epoch_dir(out_dir, epoch)
    if final.exists():
        if is_complete(final):
            raise CheckpointError(f"checkpoint {final} exists already")
        log.warning("replacing incomplete checkpoint directory %s", final)
        shutil.rmtree(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".epoch-{epoch}.", suffix=".tmp", dir=out_dir))
    try:
        save_model(tmp)
        opt_tensors, opt_meta = optimizer_state_to_files(optimizer.state_dict())
        rng_tensors, rng_meta = rng_state()
        save_file({**opt_tensors, **rng_tensors}, str(tmp / STATE_TENSORS))
        sched = {
            k: v
            for k, v in scheduler.state_dict().items()
            if isinstance(v, int | float | bool | str | list) and k != "lr_lambdas"
        }
        files = sorted(p.name for p in tmp.iterdir() if p.is_file()) + [STATE_JSON]
        meta = {
            "format_version": _FORMAT_VERSION,
            **scalars,
            "optimizer": opt_meta,
            "scheduler": sched,
            "rng": rng_meta,
            "files": files,
        }
        state_path = tmp / STATE_JSON
        state_path.write_text(json.dumps(meta, indent=1))
        for path in tmp.iterdir():  # durable before the rename makes it visible
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def read_train_state(
    directory: str | os.PathLike,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(json_meta, tensors)`` of a complete checkpoint; ``CheckpointError`` otherwise."""
    directory = Path(directory)
    if not is_complete(directory):
        raise CheckpointError(f"{directory} is not a complete training checkpoint")
    try:
        meta = json.loads((directory / STATE_JSON).read_text())
        tensors = load_file(str(directory / STATE_TENSORS))
    except Exception as exc:  # noqa: BLE001 - any read failure is a broken checkpoint
        raise CheckpointError(f"cannot read training state in {directory}: {exc}") from exc
    if meta.get("format_version") != _FORMAT_VERSION:
        raise CheckpointError(
            f"{directory}: unsupported train_state format {meta.get('format_version')!r}"
        )
    return meta, tensors
