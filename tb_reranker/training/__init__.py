"""TokenBinder training: the loop, atomic no-pickle checkpoints, decoded-frame and feature caches.

Public entry points are re-exported by :mod:`tb_reranker.train`.
"""

from __future__ import annotations

from tb_reranker.training.checkpoint import latest_checkpoint
from tb_reranker.training.features import (
    FeatureSet,
    FrameSet,
    VideoCaptionSet,
    load_features,
    load_frames,
    load_video_captions,
)
from tb_reranker.training.loop import TrainConfig, train, train_synthetic

__all__ = [
    "TrainConfig",
    "train",
    "train_synthetic",
    "latest_checkpoint",
    "VideoCaptionSet",
    "FrameSet",
    "FeatureSet",
    "load_video_captions",
    "load_frames",
    "load_features",
]
