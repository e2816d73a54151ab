"""``tb init``: a checkpoint that searches as plain CLIP does, before any TokenBinder training."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from tb_reranker.errors import AlreadyExistsError, InvalidInputError
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
        return TokenBinderConfig.tiny().replace(
            clip_model="", clip_cfg=data, num_frames=12, fusion_heads=_heads(data)
        )
    return TokenBinderConfig.from_dict(data)


def _heads(clip_cfg: dict[str, Any]) -> int:
    """Fusion heads for an open_clip config: 8 when they divide its embed dim (as ViT-B/32)."""
    width = int(clip_cfg.get("embed_dim", 0) or 0)
    for heads in (8, 4, 2, 1):
        if width and width % heads == 0:
            return heads
    return 1


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
    model = TokenBinder(config)
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
