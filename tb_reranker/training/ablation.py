"""Ablation sweeps over m, K, fusion blocks and the head (docs/method.md §3), on the fast path.

One base model supplies the backbone: ``init_checkpoint``, or (when absent) a tiny model trained
end to end first with the synthetic preset. Every variant — the base configuration included, so
the comparison is fair — then starts from that backbone with a *fresh* fusion module and head
(and fresh indicators where m changes their shape), trains for ``epochs`` with the vision tower
frozen and its features cached once, and is evaluated on the test split. The sweep is
one-factor-at-a-time around the base configuration.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from tb_reranker.errors import InvalidInputError

__all__ = ["DEFAULT_SWEEP", "SWEEP_FIELDS", "ablate", "parse_sweep", "format_ablation"]

log = logging.getLogger(__name__)

# factor -> TokenBinderConfig field
SWEEP_FIELDS: dict[str, str] = {
    "indicators": "num_indicators",
    "top_k": "top_k",
    "fusion_blocks": "fusion_blocks",
    "head": "head",
}
_ALIASES = {
    "m": "indicators",
    "k": "top_k",
    "blocks": "fusion_blocks",
    "fusion-blocks": "fusion_blocks",
    "top-k": "top_k",
}

# Small enough for minutes on a CPU: 1 base + 4 variants.
DEFAULT_SWEEP: dict[str, list[Any]] = {
    "head": ["symmetric", "listwise"],
    "indicators": [2, 4],
    "top_k": [5, 10],
    "fusion_blocks": [1, 2],
}


def parse_sweep(specs: list[str]) -> dict[str, list[Any]]:
    """``["m=2,4,6", "head=symmetric,listwise"]`` → ``{"indicators": [2, 4, 6], "head": [...]}``."""
    sweep: dict[str, list[Any]] = {}
    for spec in specs:
        name, sep, values = spec.partition("=")
        factor = _ALIASES.get(name.strip().lower(), name.strip().lower())
        if not sep or factor not in SWEEP_FIELDS or not values.strip():
            raise InvalidInputError(
                f"bad --sweep {spec!r}: use NAME=V1,V2 with NAME in m, k, blocks, head"
            )
        items = [v.strip() for v in values.split(",") if v.strip()]
        if factor == "head":
            bad = [v for v in items if v not in ("symmetric", "listwise", "listwise_slots")]
            if bad:
                raise InvalidInputError(
                    f"bad head value(s) {bad}: symmetric, listwise or listwise_slots"
                )
            sweep[factor] = items
        else:
            try:
                sweep[factor] = [int(v) for v in items]
            except ValueError as exc:
                raise InvalidInputError(f"bad --sweep {spec!r}: values must be integers") from exc
    return sweep


def _variants(base: dict[str, Any], sweep: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """The base setting, then each factor's other values one at a time (deduplicated)."""
    variants = [dict(base)]
    for factor, values in sweep.items():
        for value in values:
            variant = {**base, factor: value}
            if variant not in variants:
                variants.append(variant)
    return variants


def ablate(
    data_root: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    init_checkpoint: str | os.PathLike | None = None,
    sweep: dict[str, list[Any]] | None = None,
    epochs: int = 3,
    base_epochs: int | None = None,
    dataset: str = "generic",
    eval_split: str = "test",
    seed: int = 0,
    cache_dir: str | None = None,
    device: str = "auto",
    threads: int | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Train and evaluate each variant; return one row per variant.

    Row: ``{"indicators", "top_k", "fusion_blocks", "head", "checkpoint", "seconds",
    "t2v": {"broad": metrics, "reranked": metrics}, "v2t": {...}}``.
    """
    from tb_reranker.model import load_checkpoint
    from tb_reranker.training.features import load_video_captions
    from tb_reranker.training.loop import TrainConfig, train

    sweep = DEFAULT_SWEEP if sweep is None else sweep
    out_dir = Path(out_dir)
    base_config = TrainConfig(
        data_root=str(data_root),
        out_dir=str(out_dir / "base"),
        dataset=dataset,
        preset="synthetic",
        epochs=base_epochs,
        seed=seed,
        cache_dir=cache_dir,
        device=device,
        threads=threads,
        progress=progress,
        resume=True,
    )
    if init_checkpoint is None:
        log.info("ablation: training the base model end to end in %s", base_config.out_dir)
        init_checkpoint = train(base_config)
    base_model = load_checkpoint(init_checkpoint)
    base = {factor: getattr(base_model.config, field) for factor, field in SWEEP_FIELDS.items()}
    del base_model
    test = load_video_captions(dataset, data_root, eval_split)
    return [
        _run_variant(variant, base_config, out_dir, init_checkpoint, epochs, test)
        for variant in _variants(base, sweep)
    ]


def _run_variant(
    variant: dict[str, Any],
    base_config: Any,
    out_dir: Path,
    init_checkpoint: str | os.PathLike,
    epochs: int,
    test: Any,
) -> dict[str, Any]:
    """Fine-tune one variant from ``init_checkpoint`` (frozen backbone, fresh fusion module),
    evaluate it on ``test``; return its row."""
    from tb_reranker.model import load_checkpoint
    from tb_reranker.training.evaluate import evaluate
    from tb_reranker.training.loop import train

    name = "-".join(f"{k}{v}" for k, v in variant.items())
    started = time.monotonic()
    checkpoint = train(
        replace(
            base_config,
            out_dir=str(out_dir / name),
            init_checkpoint=str(init_checkpoint),
            init_fresh=("fusion.",),
            freeze_backbone=True,
            epochs=epochs,
            **variant,
        )
    )
    model = load_checkpoint(checkpoint, device=base_config.device)
    result = evaluate(model, test, cache_dir=base_config.cache_dir or ".tb_cache", progress=False)
    log.info(
        "ablation %s: t2v R@1 %.1f -> %.1f",
        name,
        result["t2v"]["broad"]["R@1"],
        result["t2v"]["reranked"]["R@1"],
    )
    return {
        **variant,
        "checkpoint": str(checkpoint),
        "seconds": round(time.monotonic() - started, 1),
        "t2v": result["t2v"],
        "v2t": result["v2t"],
    }


def format_ablation(rows: list[dict[str, Any]]) -> str:
    """Plain-text table: one line per variant, t2v/v2t R@1 and R@5 broad → reranked."""
    header = (
        f"{'m':>2} {'K':>3} {'blk':>3} {'head':<9} | {'t2v R@1':>13} {'t2v R@5':>13} | "
        f"{'v2t R@1':>13} {'v2t R@5':>13} | {'s':>6}"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        cells = []
        for direction in ("t2v", "v2t"):
            for k in ("R@1", "R@5"):
                cells.append(
                    f"{row[direction]['broad'][k]:5.1f} → {row[direction]['reranked'][k]:5.1f}"
                )
        lines.append(
            f"{row['indicators']:>2} {row['top_k']:>3} {row['fusion_blocks']:>3} {row['head']:<9} | "
            f"{cells[0]:>13} {cells[1]:>13} | {cells[2]:>13} {cells[3]:>13} | {row['seconds']:6.1f}"
        )
    return "\n".join(lines)
