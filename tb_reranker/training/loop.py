"""``train(TrainConfig) -> Path``: the TokenBinder training loop (docs/method.md §4, §8).

One epoch walks the training videos in a seeded random order, one random caption per video, in
batches of ``batch_size`` pairs (optionally accumulated over ``grad_accum`` micro-batches).
AdamW with two learning rates (fusion + indicators vs the CLIP backbone), linear warm-up then
cosine decay per optimizer step, bf16 autocast on CUDA. A checkpoint is written atomically at
the end of every epoch (:mod:`tb_reranker.training.checkpoint`); ``resume`` continues after the
latest complete one with the same optimizer, scheduler and RNG state.

Frames are decoded once per dataset and cached (:func:`~tb_reranker.training.features.load_frames`);
with ``freeze_backbone`` the vision features are computed once too, and only the text side,
the indicators and the fusion module train.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch

from tb_reranker.errors import AlreadyExistsError, CheckpointError, InvalidInputError
from tb_reranker.training.augment import Augment, AugmentedBatch
from tb_reranker.training.checkpoint import (
    latest_checkpoint,
    optimizer_state_from_files,
    read_train_state,
    set_rng_state,
    write_checkpoint,
)
from tb_reranker.training.features import (
    FeatureSet,
    FrameSet,
    VideoCaptionSet,
    load_features,
    load_model_frames,
    load_video_captions,
)

__all__ = [
    "TrainConfig",
    "PAPER_EPOCHS",
    "PRESETS",
    "train",
    "train_synthetic",
    "build_model_config",
]

log = logging.getLogger(__name__)

# Epochs of the paper per dataset; anything else gets 5.
PAPER_EPOCHS: dict[str, int] = {
    "msrvtt": 5,
    "didemo": 20,
    "activitynet": 20,
    "msvd": 20,
    "vatex": 20,
    "lsmdc": 10,
}

# The synthetic preset's augmentations (training/augment.py; `--augment none` turns them off).
SYNTHETIC_AUGMENT = "crop=0.5,colour=0.5,shift=0.5,reverse=0.5"

# Optimisation presets. "paper": the paper's fine-tuning of pretrained CLIP. "synthetic": the
# from-scratch tiny model of docs/method.md §8 (lr 2e-3 for the model collapsed there).
PRESETS: dict[str, dict[str, Any]] = {
    "paper": {
        "lr": 1e-4,
        "backbone_lr": 1e-6,
        "batch_size": 128,
        "epochs": None,
        "hard_negatives": False,
        "gumbel_scale": None,  # the model config's own (0.3)
        "augment": "",  # none: real captions are not rewritten unless asked (--augment)
        "weight_decay": 0.2,
        "warmup": 0.05,  # 5 % linear warm-up, then cosine to 0
        "min_lr_ratio": 0.0,
    },
    "synthetic": {
        "lr": 1e-3,
        "backbone_lr": 5e-4,
        "batch_size": 64,
        "epochs": 30,  # ~13 s each on one quiet core; still improving at 20 (results_synthetic.md)
        # random batches, as in the run that reached reranked 90 (twin batching not isolated)
        "hard_negatives": False,
        "gumbel_scale": 0.0,  # no Gumbel noise: measured better from scratch (results_synthetic.md)
        # crops, colour, shake and time-reversal twins (no flip twins): default family 88.3 ->
        # 97.7 reranked over 3 seeds at ~1.05x the time (results_synthetic.md, issue 24)
        "augment": SYNTHETIC_AUGMENT,
        "weight_decay": 0.05,  # 0.2 is for fine-tuning; from scratch 0.05 (results_synthetic.md)
        "warmup": 0.0,  # constant learning rate: no warm-up ...
        "min_lr_ratio": 1.0,  # ... and no decay
    },
}


@dataclass(frozen=True)
class TrainConfig:
    """Everything one training run needs. ``None`` fields take the preset's value."""

    data_root: str  # dataset folder (generic format: what `tb synth` writes)
    out_dir: str  # checkpoints go to <out_dir>/epoch-<n>/
    dataset: str = "generic"  # dataset loader name (tb_reranker.data), "generic" = tb synth format
    split: str = "train"  # split to train on
    model_config: str = "tiny"  # "tiny", "vit-b-32" or a TokenBinderConfig JSON file
    init_checkpoint: str | None = None  # start from these weights (its config + the overrides)
    init_fresh: tuple[str, ...] = ()  # name prefixes NOT copied from init_checkpoint (re-init)
    indicators: int | None = None  # override m
    top_k: int | None = None  # override K
    fusion_blocks: int | None = None  # override the number of fusion blocks
    head: str | None = None  # override the head: "symmetric" or "listwise"
    gumbel_scale: float | None = None  # override the Gumbel noise scale of the fusion attention
    frame_motion: bool = False  # the focused view also reads frame differences (model config)
    preset: str = "auto"  # "paper", "synthetic", or "auto" (synthetic for random-init custom CLIP
    # configs such as tiny, paper for pretrained ones)
    epochs: int | None = None  # epochs (preset / per-dataset paper value when None)
    batch_size: int | None = None  # pairs per optimizer step (before accumulation split)
    lr: float | None = None  # learning rate of fusion module + indicators
    backbone_lr: float | None = None  # learning rate of the CLIP backbone
    weight_decay: float | None = None  # AdamW weight decay (not on biases, norms, embeddings,
    # scale); preset: paper 0.2, synthetic 0.05
    warmup: float | None = None  # linear warm-up: fraction of all steps (< 1) or a step count
    # (>= 1); preset: paper 0.05, synthetic 0
    min_lr_ratio: float | None = None  # cosine decays to lr * min_lr_ratio (1 = constant lr);
    # preset: paper 0, synthetic 1
    grad_accum: int = 1  # micro-batches per optimizer step (batch_size must divide by it)
    grad_clip: float = 0.0  # max gradient norm (0 = no clipping)
    freeze_backbone: bool = False  # cache vision features once; train text side + fusion
    hard_negatives: bool | None = None  # batch word-order twins together (see _epoch_order)
    augment: str | None = None  # augmentations, "crop=0.5,flip=0.5,reverse=0.5"
    # (training/augment.py); None = the preset's (synthetic: SYNTHETIC_AUGMENT, paper: none);
    # "" or "none" = none
    augment_warmup: int = 0  # epochs over which their probabilities ramp up from 0 (0 = none)
    seed: int = 0  # seeds init, data order, caption choice, Gumbel noise
    device: str = "auto"  # "auto" (cuda if available), "cpu", "cuda", "cuda:N"
    amp: bool = True  # bf16 autocast on CUDA (ignored on CPU)
    cache_dir: str | None = None  # frame/feature cache (None = TB_CACHE_DIR or ./.tb_cache)
    workers: int = 2  # video decoding threads
    threads: int | None = None  # torch CPU threads for the run (None = torch's default)
    resume: bool = False  # continue from the latest complete checkpoint in out_dir
    max_steps_per_epoch: int | None = None  # cut epochs short (smoke tests)
    progress: bool = True  # progress bars on a terminal, log lines elsewhere

    def __post_init__(self) -> None:
        problems = []
        if self.preset not in ("auto", *PRESETS):
            problems.append(f"preset must be auto, {', '.join(PRESETS)}; got {self.preset!r}")
        for name in (
            "epochs",
            "batch_size",
            "grad_accum",
            "indicators",
            "top_k",
            "fusion_blocks",
            "threads",
        ):
            value = getattr(self, name)
            if value is not None and value < 1:
                problems.append(f"{name} must be >= 1, got {value}")
        for name in ("lr", "backbone_lr"):
            value = getattr(self, name)
            if value is not None and not value >= 0:
                problems.append(f"{name} must be >= 0, got {value}")
        if self.weight_decay is not None and not self.weight_decay >= 0:
            problems.append(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.warmup is not None and not self.warmup >= 0:
            problems.append(f"warmup must be >= 0, got {self.warmup}")
        if self.min_lr_ratio is not None and not 0 <= self.min_lr_ratio <= 1:
            problems.append(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.head is not None and self.head not in ("symmetric", "listwise", "listwise_slots"):
            problems.append(
                f"head must be symmetric, listwise or listwise_slots, got {self.head!r}"
            )
        if self.max_steps_per_epoch is not None and self.max_steps_per_epoch < 1:
            problems.append("max_steps_per_epoch must be >= 1")
        if self.augment_warmup < 0:
            problems.append(f"augment_warmup must be >= 0, got {self.augment_warmup}")
        if self.augment is not None and Augment.parse(self.augment) and self.freeze_backbone:
            problems.append("augment needs frames: it does not apply with freeze_backbone")
        if problems:
            raise InvalidInputError("invalid training config: " + "; ".join(problems))

    # ---- resolved values ---------------------------------------------------------------------
    def preset_name(self, is_tiny: bool) -> str:
        """The preset in force: ``auto`` means synthetic for the tiny model, paper otherwise."""
        if self.preset != "auto":
            return self.preset
        return "synthetic" if is_tiny else "paper"

    def resolved(self, is_tiny: bool) -> TrainConfig:
        """A copy with every ``None`` optimisation field filled from the preset."""
        preset = PRESETS[self.preset_name(is_tiny)]
        epochs = self.epochs or preset["epochs"] or PAPER_EPOCHS.get(self.dataset, 5)
        batch_size = self.batch_size or preset["batch_size"]
        if batch_size % self.grad_accum:
            raise InvalidInputError(
                f"batch_size {batch_size} is not divisible by grad_accum {self.grad_accum}"
            )
        return replace(
            self,
            epochs=epochs,
            batch_size=batch_size,
            lr=self.lr if self.lr is not None else preset["lr"],
            backbone_lr=self.backbone_lr if self.backbone_lr is not None else preset["backbone_lr"],
            hard_negatives=(
                self.hard_negatives if self.hard_negatives is not None else preset["hard_negatives"]
            ),
            gumbel_scale=(
                self.gumbel_scale if self.gumbel_scale is not None else preset["gumbel_scale"]
            ),
            weight_decay=(
                self.weight_decay if self.weight_decay is not None else preset["weight_decay"]
            ),
            warmup=self.warmup if self.warmup is not None else preset["warmup"],
            augment=self.augment if self.augment is not None else self._preset_augment(preset),
            min_lr_ratio=(
                self.min_lr_ratio if self.min_lr_ratio is not None else preset["min_lr_ratio"]
            ),
        )

    def _preset_augment(self, preset: dict[str, Any]) -> str:
        """The preset's augmentations; none with a frozen backbone (they need frames)."""
        return "" if self.freeze_backbone else str(preset["augment"])

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


# ----------------------------------------------------------------------------- helpers


def build_model_config(config: TrainConfig) -> Any:
    """The TokenBinderConfig of ``config.model_config`` with the CLI overrides applied."""
    from tb_reranker.model import TokenBinderConfig

    spec = config.model_config
    if spec == "tiny":
        model_config = TokenBinderConfig.tiny()
    elif spec in ("vit-b-32", "ViT-B-32", "vit_b_32"):
        model_config = TokenBinderConfig.vit_b_32()
    else:
        path = Path(spec)
        if not path.is_file():
            raise InvalidInputError(
                f"--config must be tiny, vit-b-32 or a TokenBinderConfig JSON file; got {spec!r}"
            )
        model_config = TokenBinderConfig.from_json(path.read_text())
    return _apply_overrides(model_config, config)


def _apply_overrides(model_config: Any, config: TrainConfig) -> Any:
    changes: dict[str, Any] = {}
    if config.indicators is not None:
        changes["num_indicators"] = config.indicators
    if config.top_k is not None:
        changes["top_k"] = config.top_k
    if config.fusion_blocks is not None:
        changes["fusion_blocks"] = config.fusion_blocks
    if config.head is not None:
        changes["head"] = config.head
    if config.gumbel_scale is not None:
        changes["gumbel_scale"] = config.gumbel_scale
    if config.freeze_backbone:
        changes["freeze_backbone"] = True
    if config.frame_motion:
        changes["frame_motion"] = True
    changes["seed"] = config.seed
    return model_config.replace(**changes) if changes else model_config


def _is_tiny(model_config: Any) -> bool:
    return model_config.clip_cfg is not None and model_config.pretrained is None


def _lr_lambda(total_steps: int, warmup_steps: int, min_ratio: float) -> Callable[[int], float]:
    """Linear warm-up from ~0 to 1 over ``warmup_steps``, then cosine to ``min_ratio``."""

    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        progress = min(1.0, max(0.0, progress))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def _epoch_order(
    captions: list[list[str]], seed: int, epoch: int, hard_negatives: bool
) -> tuple[torch.Tensor, list[int]]:
    """Seeded video order and one caption index per video for ``epoch`` (same on resume).

    With ``hard_negatives`` the order is made of adjacent *twins*: videos whose chosen captions
    hold the same words in a different order ("a red circle then a blue square" / "a blue
    square then a red circle"), which mean pooling cannot tell apart — one video per distinct
    caption of each bag of words, kept together, the groups shuffled. Twins thus share a batch
    (but for the few split at a batch boundary) and the focused view meets them among its top-K
    candidates.
    """
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    num_videos = len(captions)
    order = torch.randperm(num_videos, generator=generator)
    picks = torch.rand(num_videos, generator=generator).tolist()
    captions_idx = [int(p * len(c)) for p, c in zip(picks, captions, strict=True)]
    if not hard_negatives:
        return order, captions_idx
    groups: dict[tuple[str, ...], dict[str, list[int]]] = {}
    for i in order.tolist():  # random order within each group
        text = captions[i][captions_idx[i]]
        bag = tuple(sorted(text.lower().split()))
        groups.setdefault(bag, {}).setdefault(text, []).append(i)
    units: list[list[int]] = []  # one video per distinct caption of the same words
    for by_text in groups.values():
        queues = list(by_text.values())
        while queues:
            units.append([q.pop() for q in queues])
            queues = [q for q in queues if q]
    shuffled = torch.randperm(len(units), generator=generator).tolist()
    return torch.tensor([i for u in shuffled for i in units[u]]), captions_idx


@dataclass
class _TrainData:
    """What an epoch iterates over: frames (end to end) or cached features (frozen)."""

    videos: VideoCaptionSet  # the training videos that decoded
    frames: FrameSet | None  # decoded frames (end to end)
    features: FeatureSet | None  # cached vision features (frozen backbone)
    frames_masks: torch.Tensor  # [N, T] bool real vs padded frames


def _batch_videos(
    data: _TrainData, indices: torch.Tensor, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(videos, frames_mask [b, T]) of the videos at ``indices``: raw frames [b, T, 3, H, W]
    end to end, cached frame features [b, T, D] with a frozen backbone."""
    if data.features is not None:
        videos = data.features.frames_tokens[indices].to(device)
        masks = data.frames_masks[indices].to(device)
        return videos, masks
    assert data.frames is not None
    frames = data.frames.frames[indices].to(device=device, dtype=torch.float32)
    return frames, data.frames.masks[indices].to(device)


# ----------------------------------------------------------------------------- train


def train(
    config: TrainConfig,
    *,
    on_epoch_start: Callable[[int, Any], None] | None = None,
    on_epoch_end: Callable[[int, Path, dict[str, float]], None] | None = None,
    model_class: type | None = None,
) -> Path:
    """Train a TokenBinder as ``config`` says; return the last checkpoint directory.

    ``on_epoch_start(epoch, optimizer)`` and ``on_epoch_end(epoch, checkpoint_dir, stats)`` are
    called around each epoch (epochs count from 1); an exception raised there stops training
    (the checkpoints written so far stay valid for ``resume``). ``model_class``: a
    ``TokenBinder`` subclass to train instead (a study that overrides a scoring method, e.g.
    ``experiments/``); its checkpoints load as plain ``TokenBinder``s.
    """
    from tb_reranker.model import resolve_device, save_checkpoint

    out_dir = Path(config.out_dir)
    device = resolve_device(config.device)
    if config.threads:
        torch.set_num_threads(config.threads)
    previous = latest_checkpoint(out_dir)
    if previous is not None and not config.resume:
        raise AlreadyExistsError(
            f"{out_dir} already holds checkpoint {previous[1].name}; "
            "pass --resume to continue it or choose another --out"
        )
    start = _start_model(config, out_dir, previous, model_class)
    config, model = start.config, start.model
    torch.manual_seed(config.seed)  # Gumbel noise; data order has its own seeded generator
    model.to(device)

    data = _load_train_data(config, model, device)
    plan = _StepPlan.of(config, len(data.videos))
    optimizer, scheduler = _optimizer_and_scheduler(model, config, plan)
    history = _restore_train_state(start, optimizer, scheduler)
    if start.epoch >= config.epochs:
        log.info("nothing to do: %d of %d epochs done", start.epoch, config.epochs)
        return previous[1] if previous else out_dir

    model.precision = "auto" if config.amp else "float32"  # "auto": bf16 autocast on CUDA only
    _log_plan(config, plan, len(data.videos), device)
    last_dir = previous[1] if previous else out_dir
    for epoch in range(start.epoch + 1, config.epochs + 1):
        if on_epoch_start is not None:
            on_epoch_start(epoch, optimizer)
        stats = _run_epoch(model, data, config, plan, epoch, optimizer, scheduler, device)
        history.append(stats)
        last_dir = write_checkpoint(
            out_dir,
            epoch,
            save_model=functools.partial(save_checkpoint, model),
            optimizer=optimizer,
            scheduler=scheduler,
            scalars={
                "epoch": epoch,
                "global_step": epoch * plan.steps_per_epoch,
                "train_config": config.to_dict(),
                "history": history,
            },
        )
        if on_epoch_end is not None:
            on_epoch_end(epoch, last_dir, stats)
    (out_dir / "history.json").write_text(json.dumps(history, indent=1))
    return last_dir


@dataclass
class _Start:
    """Where training starts: the (resolved) config, the model, the epochs already done and,
    when resuming, the saved optimizer/scheduler/RNG state."""

    config: TrainConfig
    model: Any  # TokenBinder
    epoch: int = 0
    state_meta: dict[str, Any] | None = None
    state_tensors: dict[str, torch.Tensor] | None = None


def _start_model(
    config: TrainConfig,
    out_dir: Path,
    previous: tuple[int, Path] | None,
    model_class: type | None = None,
) -> _Start:
    """The model to train: the latest checkpoint when resuming, else a fresh or initialised one,
    as ``model_class`` (a ``TokenBinder`` subclass; None: ``TokenBinder``)."""
    from tb_reranker.model import TokenBinder, load_checkpoint

    if model_class is None:
        model_class = TokenBinder
    elif not (isinstance(model_class, type) and issubclass(model_class, TokenBinder)):
        raise InvalidInputError(f"model_class must be a TokenBinder subclass, got {model_class!r}")
    if config.resume and previous is not None:
        start = _resume(config, *previous)
        if type(start.model) is not model_class:  # the same weights, the study's class
            model = model_class(start.model.config, load_pretrained=False)
            model.load_state_dict(start.model.state_dict())
            start = replace(start, model=model.to(start.model.device))
        return start

    if config.resume:
        log.info("resume: no complete checkpoint in %s, starting fresh", out_dir)
    if config.init_checkpoint:
        source = load_checkpoint(config.init_checkpoint)
        config = config.resolved(_is_tiny(source.config))
        # the weights come from the checkpoint: its `pretrained` (a tag, a file) is not read
        model = model_class(_apply_overrides(source.config, config), load_pretrained=False)
        fresh = _load_matching(model, source, tuple(config.init_fresh))
        log.info("init from %s; newly initialised: %s", config.init_checkpoint, fresh or "none")
    else:
        model_config = build_model_config(config)
        config = config.resolved(_is_tiny(model_config))
        model = model_class(_apply_overrides(model_config, config))  # + preset gumbel_scale
    return _Start(config, model)


def _resume(config: TrainConfig, start_epoch: int, ckpt_dir: Path) -> _Start:
    """Continue ``ckpt_dir``: its model and training config (the checkpoint's hyper-parameters
    win over ``config``'s, with a warning; paths and machine settings come from ``config``)."""
    from tb_reranker.model import load_checkpoint

    state_meta, state_tensors = read_train_state(ckpt_dir)
    model = load_checkpoint(ckpt_dir)
    saved = state_meta.get("train_config", {})
    for name in ("epochs", "batch_size", "lr", "backbone_lr", "grad_accum", "seed"):
        if getattr(config, name) is not None and saved.get(name) not in (
            None,
            getattr(config, name),
        ):
            log.warning(
                "resume: %s=%s differs from the checkpoint's %s; using the checkpoint's",
                name,
                getattr(config, name),
                saved.get(name),
            )
    known = set(TrainConfig.field_names())
    merged = {k: v for k, v in saved.items() if k in known}
    merged.update(
        data_root=config.data_root,
        out_dir=config.out_dir,
        cache_dir=config.cache_dir,
        device=config.device,
        progress=config.progress,
        workers=config.workers,
        threads=config.threads,
        resume=True,
    )
    config = TrainConfig(**merged).resolved(_is_tiny(model.config))
    log.info("resuming from %s (epoch %d done)", ckpt_dir, start_epoch)
    return _Start(config, model, start_epoch, state_meta, state_tensors)


def _load_train_data(config: TrainConfig, model: Any, device: torch.device) -> _TrainData:
    """Decode (or read from the cache) the training videos; with ``freeze_backbone`` their
    vision features too. At least two videos must decode."""
    videos = load_video_captions(config.dataset, config.data_root, config.split)
    cache_dir = config.cache_dir or os.environ.get("TB_CACHE_DIR") or ".tb_cache"
    frame_set = load_model_frames(
        model,
        videos,
        cache_dir=cache_dir,
        workers=config.workers,
        progress=config.progress,
    )
    if config.freeze_backbone:
        features = load_features(
            model, frame_set, cache_dir=cache_dir, device=device, progress=config.progress
        )
        data = _TrainData(frame_set.videos, None, features, frame_set.masks)
    else:
        data = _TrainData(frame_set.videos, frame_set, None, frame_set.masks)
    if len(data.videos) < 2:
        raise InvalidInputError(f"need at least 2 training videos, got {len(data.videos)}")
    return data


@dataclass(frozen=True)
class _StepPlan:
    """Batch sizes and step counts of a run."""

    batch_size: int
    micro_size: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int

    @classmethod
    def of(cls, config: TrainConfig, num_videos: int) -> _StepPlan:
        batch_size = min(config.batch_size, num_videos)
        micro_size = max(1, batch_size // config.grad_accum)
        steps_per_epoch = num_videos // batch_size  # full batches only (InfoNCE: equal sizes)
        if config.max_steps_per_epoch:
            steps_per_epoch = min(steps_per_epoch, config.max_steps_per_epoch)
        total_steps = steps_per_epoch * config.epochs
        warmup = config.warmup
        warmup_steps = int(warmup) if warmup >= 1 else int(warmup * total_steps)
        return cls(batch_size, micro_size, steps_per_epoch, total_steps, warmup_steps)


def _optimizer_and_scheduler(
    model: Any, config: TrainConfig, plan: _StepPlan
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over the two parameter groups and the warm-up + cosine schedule."""
    from tb_reranker.model import param_groups

    optimizer = torch.optim.AdamW(
        param_groups(model, config.lr, config.backbone_lr, config.weight_decay),
        betas=(0.9, 0.98),
        eps=1e-6,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _lr_lambda(plan.total_steps, plan.warmup_steps, config.min_lr_ratio)
    )
    return optimizer, scheduler


def _restore_train_state(
    start: _Start, optimizer: torch.optim.Optimizer, scheduler: Any
) -> list[dict[str, float]]:
    """Load a resumed run's optimizer, scheduler and RNG state; return its history so far
    (empty for a fresh run)."""
    if start.state_meta is None or start.state_tensors is None:
        return []
    state_meta, state_tensors = start.state_meta, start.state_tensors
    try:
        optimizer.load_state_dict(
            optimizer_state_from_files(state_tensors, state_meta["optimizer"])
        )
        scheduler.load_state_dict(
            {**scheduler.state_dict(), **state_meta.get("scheduler", {}), "lr_lambdas": [None]}
        )
    except (KeyError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"cannot restore the optimizer state: {exc}") from exc
    set_rng_state(state_tensors, state_meta.get("rng", {}))
    return list(state_meta.get("history", []))


def _log_plan(config: TrainConfig, plan: _StepPlan, num_videos: int, device: torch.device) -> None:
    log.info(
        "training %d videos, %d epochs x %d steps (batch %d, accum %d), lr %.2g / backbone %.2g, "
        "%s on %s",
        num_videos,
        config.epochs,
        plan.steps_per_epoch,
        plan.batch_size,
        config.grad_accum,
        config.lr,
        config.backbone_lr,
        "frozen backbone" if config.freeze_backbone else "end to end",
        device,
    )


def _run_epoch(
    model: Any,
    data: _TrainData,
    config: TrainConfig,
    plan: _StepPlan,
    epoch: int,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    device: torch.device,
) -> dict[str, float]:
    """One epoch of optimizer steps; return its mean losses, epoch number and seconds."""
    model.train()
    order, captions_idx = _epoch_order(
        data.videos.captions, config.seed, epoch, bool(config.hard_negatives)
    )
    from tb_reranker.progress import progress

    bar = progress(
        range(plan.steps_per_epoch),
        desc=f"epoch {epoch}/{config.epochs}",
        unit="step",
        leave=False,
        enabled=config.progress,
    )
    started = time.monotonic()
    sums = {"loss": 0.0, "broad": 0.0, "focus": 0.0}
    ramp = min(1.0, (epoch - 1) / config.augment_warmup) if config.augment_warmup else 1.0
    augment = (
        Augment.parse(config.augment).scaled(ramp),
        torch.Generator().manual_seed(config.seed * 1_000_003 + epoch),
    )
    for step in bar:
        batch = order[step * plan.batch_size : (step + 1) * plan.batch_size]
        optimizer.zero_grad(set_to_none=True)
        values = _accumulate_gradients(
            model, data, batch, captions_idx, config, plan, device, augment
        )
        if not math.isfinite(values["loss"]):
            raise InvalidInputError(
                f"loss is {values['loss']} at epoch {epoch} step {step}: lower the learning rate"
            )
        if config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        scheduler.step()
        with torch.no_grad():  # CLIP clamps the learned temperature at 100
            model.clip.logit_scale.clamp_(0, math.log(100))
        for key, value in values.items():
            sums[key] += value
        bar.set_postfix(loss=f"{values['loss']:.3f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
    bar.close()
    stats = {k: v / max(1, plan.steps_per_epoch) for k, v in sums.items()}
    stats["epoch"] = epoch
    stats["seconds"] = round(time.monotonic() - started, 2)
    log.info(
        "epoch %d/%d: loss %.4f (broad %.4f, focus %.4f) in %.1fs",
        epoch,
        config.epochs,
        stats["loss"],
        stats["broad"],
        stats["focus"],
        stats["seconds"],
    )
    return stats


def _accumulate_gradients(
    model: Any,
    data: _TrainData,
    batch: torch.Tensor,
    captions_idx: list[int],
    config: TrainConfig,
    plan: _StepPlan,
    device: torch.device,
    augment: tuple[Augment, torch.Generator] | None = None,
) -> dict[str, float]:
    """Forward and backward the micro-batches of ``batch``; return the step's losses.
    ``augment``: the run's augmentations and their generator (training/augment.py)."""
    from tb_reranker.model import tokenbinder_loss

    values = {"loss": 0.0, "broad": 0.0, "focus": 0.0}
    for micro in batch.split(plan.micro_size):
        texts = [data.videos.captions[i][captions_idx[i]] for i in micro.tolist()]
        videos_input, frames_mask = _batch_videos(data, micro, device)
        if augment is not None and augment[0]:
            augmented = augment[0].batch(videos_input, frames_mask, texts, augment[1])
            videos_input, frames_mask, texts = _encode_with_reversals(model, augmented)
        losses = tokenbinder_loss(model, texts, videos_input, frames_mask=frames_mask)
        (losses["loss"] / config.grad_accum).backward()
        values["loss"] += float(losses["loss"].detach()) / config.grad_accum
        values["broad"] += float(losses["broad"]) / config.grad_accum
        values["focus"] += float(losses["focus"]) / config.grad_accum
    return values


def _encode_with_reversals(
    model: Any, augmented: AugmentedBatch
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """An augmented micro-batch as the loss's input: (videos, masks, texts).

    Without time-reversal twins, the frames themselves. With them, the frame tokens: every clip
    encoded once and each twin its clip's tokens played backwards (``reverse_frames``), which is
    what encoding the reversed frames gives (the vision tower sees one frame at a time) without
    encoding them: a reversal twin costs the text side and the fusion, not the vision tower."""
    if not augmented.reversed_of:
        return augmented.frames, augmented.masks, augmented.texts
    _, tokens = model.encode_frames(augmented.frames, augmented.masks)  # [b', T', D]
    return augmented.with_reversals(tokens)


def _load_matching(
    target: torch.nn.Module, source: torch.nn.Module, fresh_prefixes: tuple[str, ...] = ()
) -> list[str]:
    """Copy every same-named, same-shaped tensor of ``source`` into ``target`` except names
    starting with one of ``fresh_prefixes``; return the names left at their new init."""
    source_state = source.state_dict()
    target_state = target.state_dict()
    fresh = []
    for name, value in target_state.items():
        other = source_state.get(name)
        if other is not None and other.shape == value.shape and not name.startswith(fresh_prefixes):
            target_state[name] = other
        else:
            fresh.append(name)
    target.load_state_dict(target_state)
    return fresh


def train_synthetic(
    data_root: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    seed: int,
    epochs: int | None = None,
    progress: bool = True,
) -> Path:
    """Train the tiny model end to end on a ``tb synth`` folder (synthetic preset); return the
    checkpoint directory (loadable with ``load_checkpoint``)."""
    return train(
        TrainConfig(
            data_root=str(data_root),
            out_dir=str(out_dir),
            model_config="tiny",
            preset="synthetic",
            seed=seed,
            epochs=epochs,
            progress=progress,
        )
    )
