"""The zero-shot start: a TokenBinder that is exactly plain CLIP retrieval until it is trained.

``zero_shot_config`` describes it (``broad_query="clip"``: I_1 is CLIP's own text feature; the
Δ head's last layer starts at zero, so the focused view adds nothing) and ``resolve_weights``
finds the CLIP weights without touching the network when it can:

* a local file (``.safetensors``, or an open_clip ``.bin``/``.pt`` state dict read with
  ``torch.load(weights_only=True)``) is used as is, offline;
* an open_clip pretrained tag (``openai``, ``laion2b_s34b_b79k``, ...) is looked up in the
  caches first: the Hugging Face hub cache (``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else
  ``~/.cache/huggingface/hub``) for tags published there, ``~/.cache/clip`` for the others;
  only a tag that is in neither is downloaded, and a download that fails (offline) is one
  ``CheckpointError`` line.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from tb_reranker.errors import CheckpointError, InvalidInputError
from tb_reranker.model.config import TokenBinderConfig

__all__ = ["resolve_weights", "zero_shot_config", "WEIGHT_SUFFIXES"]

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_HF_WEIGHTS = "open_clip_pytorch_model.bin"
_HF_SAFE_WEIGHTS = "open_clip_model.safetensors"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _cached_tag_file(cfg: dict[str, Any]) -> str | None:
    """The cached weights file of an open_clip pretrained cfg, or None (never the network)."""
    hub = str(cfg.get("hf_hub") or "")
    if hub:
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:  # pragma: no cover - open_clip depends on it
            return None
        repo_id, filename = os.path.split(hub)
        names = [filename] if filename else [_HF_SAFE_WEIGHTS, _HF_WEIGHTS]
        if filename.endswith((".bin", ".pth")):
            names.insert(0, filename.rsplit(".", 1)[0] + ".safetensors")
        for name in names:
            found = try_to_load_from_cache(repo_id, name)
            if isinstance(found, str) and Path(found).is_file():
                return found
    url = str(cfg.get("url") or "")
    if url:
        candidate = Path("~/.cache/clip").expanduser() / os.path.basename(url)
        if candidate.is_file():
            return str(candidate)
    return None


def _check_reachable(cfg: dict[str, Any]) -> None:
    """Fail at once when the download host cannot be reached (the hub client would otherwise
    retry for most of a minute, logging each attempt)."""
    import socket
    from urllib.parse import urlsplit

    if cfg.get("hf_hub"):
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            raise ConnectionError("HF_HUB_OFFLINE is set and the weights are not cached")
        url = constants.ENDPOINT
    else:
        url = str(cfg.get("url") or "")
    parts = urlsplit(url)
    host, port = parts.hostname, parts.port or (80 if parts.scheme == "http" else 443)
    if not host:
        return
    try:
        socket.create_connection((host, port), timeout=5).close()
    except OSError as exc:
        raise ConnectionError(f"{host} is not reachable: {exc}") from exc


def resolve_weights(clip_model: str | None, pretrained: str) -> tuple[str, dict[str, Any]]:
    """``(local weights file, facts)`` for ``pretrained``: a file path, or an open_clip tag of
    ``clip_model`` (cache first, then one download). ``facts`` says where it came from and, for
    a tag, its ``quick_gelu`` and normalisation.

    Raises:
        CheckpointError: a path that is not a file, or a tag neither cached nor downloadable.
        InvalidInputError: a tag open_clip does not know for ``clip_model``.
    """
    path = Path(pretrained).expanduser()
    if path.is_file():
        return str(path.resolve()), {"source": "file"}
    looks_like_path = os.sep in pretrained or pretrained.endswith(WEIGHT_SUFFIXES)
    if looks_like_path or not clip_model:
        raise CheckpointError(
            f"CLIP weights file {pretrained} does not exist"
            + ("" if clip_model else " (a custom open_clip config takes a local weights file)")
        )
    import open_clip

    cfg = open_clip.get_pretrained_cfg(clip_model, pretrained)
    if not cfg:
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(clip_model)) or "none"
        raise InvalidInputError(
            f"{pretrained!r} is neither a file nor an open_clip pretrained tag of {clip_model} "
            f"(its tags: {tags})"
        )
    facts = {
        "source": "tag",
        "tag": pretrained,
        "quick_gelu": bool(cfg.get("quick_gelu", False)),
        "mean": cfg.get("mean"),
        "std": cfg.get("std"),
    }
    cached = _cached_tag_file(cfg)
    if cached is not None:
        log.info("CLIP weights %s/%s found in the cache: %s", clip_model, pretrained, cached)
        return cached, facts
    log.info("CLIP weights %s/%s are not cached: downloading them", clip_model, pretrained)
    from open_clip.pretrained import download_pretrained

    try:
        _check_reachable(cfg)
        target = download_pretrained(cfg)
    except Exception as exc:  # noqa: BLE001 - hub/URL errors of every kind, offline included
        raise CheckpointError(
            f"cannot download the CLIP weights {clip_model}/{pretrained} "
            f"({_first_line(exc)}); connect once to fill the cache, or pass a local weights "
            "file: --pretrained FILE"
        ) from exc
    if not target or not Path(target).is_file():
        raise CheckpointError(
            f"open_clip found no weights to download for {clip_model}/{pretrained}"
        )
    return str(target), facts


def zero_shot_config(
    base: TokenBinderConfig, pretrained: str | None, **overrides: Any
) -> TokenBinderConfig:
    """``base`` turned into a zero-shot start: CLIP weights from ``pretrained`` (a tag of the
    named model or a local file), ``broad_query="clip"``. ``overrides`` are config fields
    (``num_indicators``, ``top_k``, ``num_frames``...).

    A tag trained with QuickGELU (OpenAI's) on a model name without it selects the model's
    ``-quickgelu`` twin: the same weights through the other activation give other features.
    """
    pretrained = pretrained or base.pretrained
    if not pretrained:
        raise InvalidInputError(
            "a zero-shot checkpoint needs CLIP weights: --pretrained TAG (a named open_clip "
            "model) or --pretrained FILE"
        )
    clip_model = None if base.clip_cfg is not None else base.clip_model
    weights, facts = resolve_weights(clip_model, pretrained)
    changes: dict[str, Any] = {"pretrained": weights, "broad_query": "clip"}
    if clip_model is not None and facts.get("quick_gelu") and "quickgelu" not in clip_model:
        import open_clip

        twin = f"{clip_model}-quickgelu"
        if twin in open_clip.list_models():
            changes["clip_model"] = twin
    extra = dict(base.extra)
    extra["init"] = {"pretrained": pretrained, "weights": weights, "source": facts["source"]}
    changes["extra"] = extra
    changes.update(overrides)
    return base.replace(**changes)
