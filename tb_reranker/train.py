"""Training entry points: ``train(TrainConfig) -> Path`` and ``train_synthetic(...)``.

The implementation lives in :mod:`tb_reranker.training` (loop, checkpoints, frame/feature
caches); this module is the stable public face the CLI and the demo import.
"""

from __future__ import annotations

from tb_reranker.training.loop import PAPER_EPOCHS, PRESETS, TrainConfig, train, train_synthetic

__all__ = ["TrainConfig", "PRESETS", "PAPER_EPOCHS", "train", "train_synthetic"]
