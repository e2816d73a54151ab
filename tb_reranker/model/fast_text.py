"""The text tower's residual block on packed weights: what an inference model runs in place of
open_clip's plain ``ResidualAttentionBlock`` (swapped in by :func:`swap_blocks`, once, when the
model is prepared; see :mod:`tb_reranker.model.inference`).

The same operations as open_clip's block (pre-LN self-attention through a fused QKV projection,
scaled dot-product attention with the additive causal mask, output projection, LayerScale,
pre-LN MLP), with every linear layer on oneDNN's packed weights
(:mod:`tb_reranker.model.packed_linear`): PyTorch's ``nn.MultiheadAttention`` reads its
``in_proj_weight`` itself, so swapping its linear layers alone would not reach it. The swapped
block keeps open_clip's state-dict names (``attn.in_proj_weight``, ``mlp.c_fc.weight``, ...):
a prepared model's fingerprint and checkpoint are the model's own.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from tb_reranker.model.packed_linear import PackedLinear, Repacking

__all__ = ["PackedSelfAttention", "PackedResidualBlock", "is_plain_block", "swap_blocks"]

# open_clip's ResidualAttentionBlock as this module reproduces it: its direct children, in order
# (``ln_1_kv`` only exists for cross-attention, which is not reproduced)
PLAIN_BLOCK_CHILDREN = ("ln_1", "attn", "ls_1", "ln_2", "mlp", "ls_2")


def is_plain_block(block: nn.Module | None) -> bool:
    """An open_clip ``ResidualAttentionBlock`` that :class:`PackedResidualBlock` reproduces:
    self-attention through a standard ``nn.MultiheadAttention`` (fused QKV, batch first, no
    dropout, no extra K/V), an ``nn.Sequential`` MLP of ``c_fc`` / activation / ``c_proj``."""
    if block is None or type(block).__name__ != "ResidualAttentionBlock":
        return False
    attn = getattr(block, "attn", None)
    mlp = getattr(block, "mlp", None)
    return (
        tuple(name for name, _ in block.named_children()) == PLAIN_BLOCK_CHILDREN
        and isinstance(attn, nn.MultiheadAttention)
        and attn._qkv_same_embed_dim
        and attn.batch_first
        and attn.bias_k is None
        and attn.in_proj_bias is not None
        and not attn.add_zero_attn
        and attn.dropout == 0.0
        and isinstance(mlp, nn.Sequential)
        and [name for name, _ in mlp.named_children()] == ["c_fc", "gelu", "c_proj"]
        and isinstance(mlp.c_fc, nn.Linear)
        and isinstance(mlp.c_proj, nn.Linear)
    )


class PackedSelfAttention(Repacking):
    """``nn.MultiheadAttention`` self-attention (``attn(x, x, x, attn_mask=mask)``) on packed
    weights; state names as PyTorch's: ``in_proj_weight``, ``in_proj_bias``, ``out_proj.*``."""

    PACKED = (("in_proj_weight", "in_proj_bias"),)

    def __init__(self, attn: nn.MultiheadAttention) -> None:
        super().__init__()
        self.num_heads = int(attn.num_heads)
        self.register_buffer("in_proj_weight", attn.in_proj_weight.detach().clone())
        self.register_buffer("in_proj_bias", attn.in_proj_bias.detach().clone())
        self.out_proj = PackedLinear.from_linear(attn.out_proj)
        self.repack()

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, P, W], attn_mask [P, P] additive or None -> [B, P, W]"""
        batch_size, positions, width = x.shape
        heads = self.num_heads
        qkv = self.linear(x, "in_proj_weight", "in_proj_bias")  # [B, P, 3W]
        qkv = qkv.view(batch_size, positions, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # [B, H, P, d] each
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # [B, H, P, d]
        return self.out_proj(out.transpose(1, 2).reshape(batch_size, positions, width))


class PackedResidualBlock(nn.Module):
    """open_clip's plain ``ResidualAttentionBlock`` with packed linear layers (its norms,
    LayerScales and activation are the block's own modules, shared)."""

    def __init__(self, block: nn.Module) -> None:
        if not is_plain_block(block):
            raise TypeError(f"not a plain open_clip residual block: {type(block).__name__}")
        super().__init__()
        self.ln_1 = block.ln_1
        self.attn = PackedSelfAttention(block.attn)
        self.ls_1 = block.ls_1
        self.ln_2 = block.ln_2
        self.mlp = nn.Sequential(
            OrderedDict(
                (name, PackedLinear.from_linear(layer) if isinstance(layer, nn.Linear) else layer)
                for name, layer in block.mlp.named_children()
            )
        )
        self.ls_2 = block.ls_2

    def get_weight_dtype(self) -> torch.dtype:
        """The dtype open_clip's ``Transformer.get_cast_dtype`` reads from its first block."""
        return self.mlp.c_fc.weight.dtype

    def forward(
        self,
        q_x: torch.Tensor,
        k_x: torch.Tensor | None = None,
        v_x: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """open_clip's block call, self-attention only: q_x [B, P, W] -> [B, P, W]."""
        if k_x is not None or v_x is not None:
            raise ValueError("the packed text block does self-attention only")
        mask = attn_mask.to(q_x.dtype) if attn_mask is not None else None
        x = q_x + self.ls_1(self.attn(self.ln_1(q_x), mask))
        return x + self.ls_2(self.mlp(self.ln_2(x)))


def swap_blocks(transformer: nn.Module) -> int:
    """Swap each plain block of an open_clip ``Transformer`` (``resblocks``) for a
    :class:`PackedResidualBlock`, in place; other block types stay. Returns how many."""
    blocks = getattr(transformer, "resblocks", None)
    if not isinstance(blocks, nn.ModuleList) or not getattr(transformer, "batch_first", True):
        return 0
    swapped = 0
    for index, block in enumerate(blocks):
        if is_plain_block(block):
            blocks[index] = PackedResidualBlock(block)
            swapped += 1
    return swapped
