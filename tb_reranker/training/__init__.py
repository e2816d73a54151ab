"""TokenBinder training and evaluation: the loop, atomic no-pickle checkpoints, decoded-frame and
feature caches, retrieval evaluation (broad vs reranked) and ablation sweeps.

Entry points: ``train(TrainConfig) -> Path``, ``train_synthetic(...)``, ``evaluate(model, data)``.
"""

from __future__ import annotations

from tb_reranker.training.checkpoint import latest_checkpoint
from tb_reranker.training.evaluate import evaluate, format_table, plot_recall_curves
from tb_reranker.training.features import (
    FeatureSet,
    FrameSet,
    VideoCaptionSet,
    load_features,
    load_frames,
    load_video_captions,
)
from tb_reranker.training.loop import PAPER_EPOCHS, PRESETS, TrainConfig, train, train_synthetic

__all__ = [
    "TrainConfig",
    "PRESETS",
    "PAPER_EPOCHS",
    "train",
    "train_synthetic",
    "evaluate",
    "format_table",
    "plot_recall_curves",
    "latest_checkpoint",
    "VideoCaptionSet",
    "FrameSet",
    "FeatureSet",
    "load_video_captions",
    "load_frames",
    "load_features",
]
