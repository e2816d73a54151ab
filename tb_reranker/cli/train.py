"""``tb train``: train a TokenBinder on a dataset folder; every flag also reads ``TB_<FLAG>``."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from tb_reranker.config import env
from tb_reranker.errors import InvalidInputError
from tb_reranker.numbers import COUNT, FRACTION, POSITIVE_INT, RATE, REAL, SEED, THREADS

__all__ = [
    "register",
    "run",
    "EnvOption",
    "add_options",
    "resolve_env",
    "parse_bool",
    "TRAIN_OPTIONS",
]


def parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {text!r}")


@dataclass(frozen=True)
class EnvOption:
    """One command-line flag whose default comes from ``TB_<ENV>`` when the flag is absent."""

    flag: str  # e.g. "--lr"
    dest: str  # argparse destination, e.g. "lr"
    kind: Callable[[str], Any]  # parses the value (str, int, float, parse_bool)
    help: str  # help line (the env variable name is appended)
    choices: Sequence[str] | None = None  # allowed values
    fallback: Any = None  # value when neither flag nor variable is given
    switch: bool = False  # a flag without a value (sets True); TB_<NAME> takes 1/0, true/false

    @property
    def env_name(self) -> str:
        return self.dest.upper()


def add_options(parser: argparse.ArgumentParser, options: Sequence[EnvOption]) -> None:
    """Add ``options`` to ``parser`` with ``None`` defaults (resolved later by resolve_env)."""
    for option in options:
        text = f"{option.help} [TB_{option.env_name}]"
        if option.switch:
            parser.add_argument(
                option.flag, dest=option.dest, action="store_const", const=True, help=text
            )
        else:
            parser.add_argument(
                option.flag,
                dest=option.dest,
                type=option.kind,
                choices=option.choices,
                default=None,
                help=text,
            )


def resolve_env(
    args: argparse.Namespace, options: Sequence[EnvOption], required: Sequence[str] = ()
) -> None:
    """Fill every option left unset on the command line from ``TB_<NAME>``, then its fallback.

    A malformed variable, or an option of ``required`` (destinations) left empty, raises
    ``InvalidInputError`` naming it (the CLI exits 2).
    """
    for option in options:
        if getattr(args, option.dest, None) is not None:
            continue
        raw = env(option.env_name)
        if raw is None:
            setattr(args, option.dest, option.fallback)
            continue
        try:
            value = option.kind(raw)
        except ValueError as exc:
            raise InvalidInputError(f"TB_{option.env_name}={raw!r} is invalid: {exc}") from exc
        if option.choices is not None and value not in option.choices:
            raise InvalidInputError(
                f"TB_{option.env_name}={raw!r} must be one of {', '.join(option.choices)}"
            )
        setattr(args, option.dest, value)
    for option in options:
        if option.dest in required and not getattr(args, option.dest):
            raise InvalidInputError(f"{option.flag} (or TB_{option.env_name}) is required")


# Flags shared by `tb train` and `tb ablate` (model overrides and optimisation).
MODEL_OPTIONS: tuple[EnvOption, ...] = (
    EnvOption(
        "--indicators",
        "indicators",
        POSITIVE_INT.parse,
        "override m, the number of query indicators",
    ),
    EnvOption("--top-k", "top_k", POSITIVE_INT.parse, "override K, the focused-view candidates"),
    EnvOption(
        "--fusion-blocks",
        "fusion_blocks",
        POSITIVE_INT.parse,
        "override the number of fusion blocks",
    ),
    EnvOption(
        "--head",
        "head",
        str,
        "override the head",
        choices=("symmetric", "listwise", "listwise_slots"),
    ),
    EnvOption(
        "--gumbel-scale", "gumbel_scale", REAL.parse, "override the Gumbel noise scale (0 = off)"
    ),
    EnvOption(
        "--frame-motion",
        "frame_motion",
        parse_bool,
        "the focused view also sees each frame's change from the previous one",
        switch=True,
    ),
)
OPTIM_OPTIONS: tuple[EnvOption, ...] = (
    EnvOption(
        "--preset",
        "preset",
        str,
        "optimisation preset: paper (METHOD §4) or synthetic (tiny from scratch); auto = "
        "synthetic for --config tiny",
        choices=("auto", "paper", "synthetic"),
        fallback="auto",
    ),
    EnvOption(
        "--epochs", "epochs", POSITIVE_INT.parse, "epochs (preset / paper value per dataset)"
    ),
    EnvOption(
        "--batch-size", "batch_size", POSITIVE_INT.parse, "pairs per optimizer step (paper 128)"
    ),
    EnvOption("--lr", "lr", RATE.parse, "learning rate of fusion + indicators (paper 1e-4)"),
    EnvOption("--backbone-lr", "backbone_lr", REAL.parse, "learning rate of CLIP (paper 1e-6)"),
    EnvOption(
        "--weight-decay",
        "weight_decay",
        REAL.parse,
        "AdamW weight decay (paper 0.2, synthetic 0.05)",
    ),
    EnvOption(
        "--warmup",
        "warmup",
        REAL.parse,
        "warm-up: fraction of steps (<1) or steps (paper 0.05, synthetic 0 = constant lr)",
    ),
    EnvOption(
        "--min-lr-ratio",
        "min_lr_ratio",
        FRACTION.parse,
        "cosine decays to lr x this (paper 0; synthetic 1 = constant lr)",
    ),
    EnvOption(
        "--grad-accum", "grad_accum", POSITIVE_INT.parse, "micro-batches per step", fallback=1
    ),
    EnvOption("--grad-clip", "grad_clip", REAL.parse, "max gradient norm, 0 = off", fallback=0.0),
    EnvOption("--seed", "seed", SEED.parse, "random seed", fallback=0),
    EnvOption("--device", "device", str, "auto, cpu, cuda, cuda:N", fallback="auto"),
    EnvOption("--cache-dir", "cache_dir", str, "frame/feature cache directory (./.tb_cache)"),
    EnvOption("--workers", "workers", THREADS.parse, "video decoding threads", fallback=2),
    EnvOption("--threads", "threads", THREADS.parse, "torch CPU threads (torch default)"),
)
TRAIN_OPTIONS: tuple[EnvOption, ...] = (
    EnvOption("--data", "data", str, "dataset root (generic folder: what `tb synth` writes)"),
    EnvOption("--dataset", "dataset", str, "dataset format name", fallback="generic"),
    EnvOption("--split", "split", str, "split to train on", fallback="train"),
    EnvOption("--out", "out", str, "output directory of the checkpoints"),
    EnvOption(
        "--config", "config", str, "model: tiny, vit-b-32 or a config JSON file", fallback="tiny"
    ),
    EnvOption("--init", "init", str, "start from this checkpoint's weights"),
    *MODEL_OPTIONS,
    *OPTIM_OPTIONS,
    EnvOption(
        "--max-steps-per-epoch",
        "max_steps_per_epoch",
        POSITIVE_INT.parse,
        "cut epochs short (smoke)",
    ),
    EnvOption(
        "--hard-negatives",
        "hard_negatives",
        parse_bool,
        "on|off: batch word-order twin captions together (preset: on for synthetic)",
    ),
    EnvOption(
        "--augment",
        "augment",
        str,
        "augmentations NAME=P,...: crop, colour, shift, zoom, noise, time (caption kept), flip, "
        "reverse (caption rewritten, added as in-batch twins); default: the preset's (synthetic: "
        "crop,colour,shift,reverse at 0.5; paper: none); none = off",
    ),
    EnvOption(
        "--augment-warmup",
        "augment_warmup",
        COUNT.parse,
        "epochs over which the augmentations' probabilities ramp up from 0 (first epoch clean)",
        fallback=0,
    ),
    EnvOption(
        "--freeze-backbone",
        "freeze_backbone",
        parse_bool,
        "cache vision features once",
        switch=True,
    ),
    EnvOption(
        "--resume", "resume", parse_bool, "continue from the latest complete epoch", switch=True
    ),
    EnvOption("--no-amp", "no_amp", parse_bool, "disable bf16 autocast on CUDA", switch=True),
    EnvOption("--no-progress", "no_progress", parse_bool, "no progress bars", switch=True),
    EnvOption("--json", "json", parse_bool, "print the result as JSON", switch=True),
)


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "train",
        help="train a TokenBinder (paper settings; --preset synthetic for the tiny model)",
        description="Train a TokenBinder. Checkpoints go to <out>/epoch-<n>/ every epoch; "
        "--resume continues after the latest complete one.",
    )
    add_options(parser, TRAIN_OPTIONS)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tb_reranker.training import TrainConfig, train

    resolve_env(args, TRAIN_OPTIONS, required=("data", "out"))
    config = TrainConfig(
        data_root=args.data,
        out_dir=args.out,
        dataset=args.dataset,
        split=args.split,
        model_config=args.config,
        init_checkpoint=args.init,
        indicators=args.indicators,
        top_k=args.top_k,
        fusion_blocks=args.fusion_blocks,
        head=args.head,
        preset=args.preset,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        backbone_lr=args.backbone_lr,
        weight_decay=args.weight_decay,
        warmup=args.warmup,
        min_lr_ratio=args.min_lr_ratio,
        grad_accum=args.grad_accum,
        grad_clip=args.grad_clip,
        freeze_backbone=bool(args.freeze_backbone),
        hard_negatives=args.hard_negatives,
        augment=args.augment,
        augment_warmup=args.augment_warmup,
        gumbel_scale=args.gumbel_scale,
        frame_motion=bool(args.frame_motion),
        seed=args.seed,
        device=args.device,
        amp=not args.no_amp,
        cache_dir=args.cache_dir,
        workers=args.workers,
        threads=args.threads,
        resume=bool(args.resume),
        max_steps_per_epoch=args.max_steps_per_epoch,
        progress=not args.no_progress,
    )
    checkpoint = train(config)
    if args.json:
        print(json.dumps({"checkpoint": str(checkpoint)}))
    else:
        print(f"checkpoint: {checkpoint}")
    return 0
