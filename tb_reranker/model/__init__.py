"""TokenBinder model core: CLIP encoders with query indicators, focused-view fusion, losses.

Pure torch (open_clip for the towers); the only I/O is ``save_checkpoint`` / ``load_checkpoint``.

>>> cfg = TokenBinderConfig.tiny()
>>> model = TokenBinder(cfg).eval()
>>> indicators = model.encode_text(["a red cube then a blue ball"])  # [1, m, D]
>>> save_checkpoint(model, "ckpt"); model = load_checkpoint("ckpt", device="auto")
"""

from tb_reranker.model.checkpoint import load_checkpoint, save_checkpoint
from tb_reranker.model.config import TokenBinderConfig
from tb_reranker.model.fusion import FocusedFusion, FocusedScores
from tb_reranker.model.losses import (
    focused_ce_loss,
    infonce_loss,
    param_groups,
    select_candidates,
    tokenbinder_loss,
)
from tb_reranker.model.precision import resolve_device
from tb_reranker.model.pretrained import resolve_weights, zero_shot_config
from tb_reranker.model.tokenbinder import TokenBinder

__all__ = [
    "TokenBinder",
    "TokenBinderConfig",
    "FocusedScores",
    "FocusedFusion",
    "param_groups",
    "tokenbinder_loss",
    "infonce_loss",
    "focused_ce_loss",
    "select_candidates",
    "save_checkpoint",
    "load_checkpoint",
    "resolve_device",
    "resolve_weights",
    "zero_shot_config",
]
