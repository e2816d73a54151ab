"""``tb init``: a checkpoint that searches as plain CLIP does, before any TokenBinder training."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from tb_reranker.errors import AlreadyExistsError, CheckpointError, InvalidInputError, TBError
from tb_reranker.numbers import POSITIVE_INT

__all__ = ["register", "run", "base_config"]


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "init",
        help="write a zero-shot checkpoint (plain CLIP retrieval) to ingest and search at once",
        description="Write a TokenBinder checkpoint whose broad view is exactly plain CLIP "
        "retrieval (I_1 = CLIP's text feature) and whose focused view starts at Δ = 0, so "
        "search ranks as CLIP mean-pooling does until you train it (`tb train --init DIR "
        "--freeze-backbone` keeps the ingested library valid). A local weights file works "
        "offline; a tag is read from the open_clip / Hugging Face caches, downloaded only when "
        "not there.",
    )
    parser.add_argument(
        "--config",
        default="vit-b-32",
        help="vit-b-32 (default), tiny, an open_clip model-config JSON file (embed_dim, "
        "vision_cfg, text_cfg) or a TokenBinderConfig JSON file",
    )
    parser.add_argument(
        "--pretrained",
        default=None,
        help="CLIP weights: an open_clip tag (vit-b-32: openai, the default) or a local file "
        "(.safetensors, or an open_clip .bin/.pt state dict)",
    )
    parser.add_argument("--out", required=True, help="checkpoint directory to write")
    parser.add_argument(
        "--indicators", type=POSITIVE_INT.parse, default=None, help="m, query indicators (4)"
    )
    parser.add_argument(
        "--top-k", type=POSITIVE_INT.parse, default=None, help="K, focused-view candidates (10)"
    )
    parser.add_argument(
        "--frames", type=POSITIVE_INT.parse, default=None, help="T, frames sampled per video"
    )
    parser.add_argument("--force", action="store_true", help="overwrite an existing checkpoint")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.set_defaults(func=run)


def base_config(spec: str) -> Any:
    """The ``TokenBinderConfig`` named by ``--config`` (before the zero-shot changes)."""
    from tb_reranker.model import TokenBinderConfig

    if spec in ("vit-b-32", "ViT-B-32", "vit_b_32"):
        return TokenBinderConfig.vit_b_32()
    if spec == "tiny":
        return TokenBinderConfig.tiny()
    path = Path(spec)
    if not path.is_file():
        raise InvalidInputError(
            f"--config must be vit-b-32, tiny or a JSON file; {spec!r} is none of them"
        )
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidInputError(f"--config {path} is not readable JSON: {exc}") from exc
    if isinstance(data, dict) and "vision_cfg" in data:  # an open_clip model config
        check_clip_cfg(data, f"--config {path}")
        return TokenBinderConfig.tiny().replace(
            clip_model="", clip_cfg=data, num_frames=12, fusion_heads=_heads(data)
        )
    if not isinstance(data, dict):
        raise InvalidInputError(f"--config {path} must hold a JSON object")
    try:
        config = TokenBinderConfig.from_dict(data)
    except (TypeError, ValueError, KeyError) as exc:  # InvalidInputError is a ValueError
        raise InvalidInputError(f"--config {path}: {exc}") from None
    if config.clip_cfg is not None:
        check_clip_cfg(config.clip_cfg, f"--config {path}")
    return config


# (section, key, required, upper bound): the open_clip shape fields a model is built from;
# the bounds keep a typo from allocating a tensor of petabytes
_SHAPE_FIELDS = (
    ("", "embed_dim", True, 16384),
    ("vision_cfg", "image_size", True, 4096),
    ("vision_cfg", "patch_size", True, 4096),
    ("vision_cfg", "width", True, 16384),
    ("vision_cfg", "layers", True, 256),
    ("vision_cfg", "head_width", False, 16384),
    ("text_cfg", "context_length", False, 4096),
    ("text_cfg", "vocab_size", False, 1_000_000),
    ("text_cfg", "width", False, 16384),
    ("text_cfg", "heads", False, 1024),
    ("text_cfg", "layers", False, 256),
)


def check_clip_cfg(cfg: Any, where: str) -> None:
    """Refuse an open_clip model config whose shapes cannot build a model: every size a
    positive int within bounds, the image a whole number of patches, the widths a whole number
    of heads (open_clip would raise ZeroDivisionError or RuntimeError, or allocate forever)."""
    if not isinstance(cfg, dict):
        raise InvalidInputError(f"{where}: the open_clip config must be a JSON object")
    values: dict[str, int] = {}
    for section, key, required, high in _SHAPE_FIELDS:
        holder = cfg if not section else cfg.get(section)
        name = f"{section}.{key}" if section else key
        if not isinstance(holder, dict):
            raise InvalidInputError(f"{where}: {section} must be a JSON object")
        if key not in holder:
            if required:
                raise InvalidInputError(f"{where}: {name} is missing")
            continue
        value = holder[key]
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high:
            raise InvalidInputError(
                f"{where}: {name} must be an integer in 1..{high}, got {value!r}"
            )
        values[name] = value
    _check_divides(values, where, "vision_cfg.patch_size", "vision_cfg.image_size")
    _check_divides(values, where, "vision_cfg.head_width", "vision_cfg.width")
    _check_divides(values, where, "text_cfg.heads", "text_cfg.width")


def _check_divides(values: dict[str, int], where: str, part: str, whole: str) -> None:
    if part in values and whole in values and values[whole] % values[part]:
        raise InvalidInputError(
            f"{where}: {whole} ({values[whole]}) must be a multiple of {part} ({values[part]})"
        )


def _heads(clip_cfg: dict[str, Any]) -> int:
    """Fusion heads for an open_clip config: 8 when they divide its embed dim (as ViT-B/32)."""
    width = int(clip_cfg.get("embed_dim", 0) or 0)
    for heads in (8, 4, 2, 1):
        if width and width % heads == 0:
            return heads
    return 1


def _build(factory: Any, config: Any, spec: str) -> Any:
    """The model of ``config``, its weights checked finite: a config the checks above let
    through but torch refuses is a one-line InvalidInputError, NaN/inf weights a
    CheckpointError (they would only fail later, at the first search)."""
    import torch

    try:
        model = factory(config)
    except TBError:
        raise
    except Exception as exc:  # noqa: BLE001 - torch/open_clip raise many kinds for bad shapes
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise InvalidInputError(
            f"--config {spec} cannot build a model: {type(exc).__name__}: {first}"
        ) from exc
    with torch.no_grad():
        bad = [
            n
            for n, p in model.state_dict().items()
            if p.is_floating_point() and not bool(torch.isfinite(p).all())
        ]
    if bad:
        raise CheckpointError(
            f"the CLIP weights {config.pretrained} hold NaN/inf values in {len(bad)} tensors "
            f"({', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}): refused"
        )
    return model


def run(args: argparse.Namespace) -> int:
    from tb_reranker.model import TokenBinder, save_checkpoint
    from tb_reranker.model.checkpoint import CONFIG_FILE
    from tb_reranker.model.pretrained import zero_shot_config

    out = Path(args.out)
    if (out / CONFIG_FILE).exists() and not args.force:
        raise AlreadyExistsError(f"{out} already holds a checkpoint (--force overwrites it)")
    overrides = {
        name: value
        for name, value in (
            ("num_indicators", args.indicators),
            ("top_k", args.top_k),
            ("num_frames", args.frames),
        )
        if value is not None
    }
    config = zero_shot_config(base_config(args.config), args.pretrained, **overrides)
    model = _build(TokenBinder, config, args.config)
    save_checkpoint(model, out)
    result = {
        "checkpoint": str(out),
        "clip_model": config.clip_model or "custom",
        "pretrained": config.extra["init"]["pretrained"],
        "weights": config.pretrained,
        "fingerprint": model.fingerprint(),
        "vision_fingerprint": model.vision_fingerprint(),
        "query_fingerprint": model.query_fingerprint(),
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"checkpoint: {out} (zero-shot {result['clip_model']}, weights {result['weights']}; "
            f"vision fingerprint {result['vision_fingerprint']})"
        )
        print(f"next: tb ingest VIDEOS --checkpoint {out}")
    return 0
