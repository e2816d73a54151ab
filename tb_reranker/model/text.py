"""The CLIP text tower with m learned query indicators appended after the end-of-text token."""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

__all__ = ["IndicatorTextEncoder", "eot_positions"]


def eot_positions(texts_tokens: torch.Tensor, pool_type: str, eos_id: int | None) -> torch.Tensor:
    """Index of the end-of-text token per row, as open_clip's ``text_global_pool`` finds it.

    texts_tokens: [B, L] int64 -> [B] int64
    """
    if pool_type == "eos":
        return (texts_tokens == eos_id).int().argmax(dim=-1)
    return texts_tokens.argmax(dim=-1)  # "argmax": CLIP's EOT id is the largest in the vocab


class _PackedTower:
    """oneDNN-prepacked copies of the text transformer's linear weights, for the CPU float32
    inference pass (:meth:`IndicatorTextEncoder._transformer`).

    A short text is 10-20 rows per linear layer: a plain ``F.linear`` then spends most of its
    time re-packing the cold weight matrix on every call; prepacked weights skip that (the
    arithmetic is the same fp32 one, the result equal to float rounding). Rebuilt when a weight
    changes; never copied or pickled (a deep copy starts empty).
    """

    def __init__(self) -> None:
        self.key: tuple[Any, ...] | None = None
        self.layers: list[dict[str, Any]] = []
        self.broken = False  # the ops failed once on this torch build: never try again

    def __deepcopy__(self, memo: dict[int, Any]) -> _PackedTower:
        return _PackedTower()

    def __getstate__(self) -> dict[str, Any]:
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()  # type: ignore[misc]


def _supported_blocks(transformer: nn.Module) -> list[nn.Module] | None:
    """The open_clip residual blocks when the prepacked pass can replace their linear layers
    exactly (open_clip's own Transformer and ResidualAttentionBlock, plain self-attention)."""
    try:
        from open_clip.transformer import ResidualAttentionBlock, Transformer
    except ImportError:  # pragma: no cover - open_clip is a dependency
        return None
    if type(transformer) is not Transformer:
        return None
    blocks = list(getattr(transformer, "resblocks", []))
    for block in blocks:
        attention = getattr(block, "attn", None)
        mlp = getattr(block, "mlp", None)
        if (
            type(block) is not ResidualAttentionBlock
            or hasattr(block, "ln_1_kv")
            or not isinstance(attention, nn.MultiheadAttention)
            or not attention._qkv_same_embed_dim
            or attention.in_proj_bias is None
            or attention.bias_k is not None
            or attention.add_zero_attn
            or not isinstance(mlp, nn.Sequential)
            or list(mlp._modules) != ["c_fc", "gelu", "c_proj"]
            or not all(isinstance(mlp[i], nn.Linear) and mlp[i].bias is not None for i in (0, 2))
        ):
            return None
    return blocks


def _packed_ops_available() -> bool:
    return bool(
        torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


class IndicatorTextEncoder(nn.Module):
    """CLIP text encoder that also returns m query indicators I_1..I_m (METHOD.md §1).

    The indicator embeddings are written into the input sequence at positions ``eot+1 ..
    eot+m`` with the positional embeddings of those positions, the text having been truncated to
    ``context_length - m`` tokens. CLIP's causal mask is kept, so each indicator attends to the
    whole sentence (and to the indicators before it) while no sentence token, the EOT included,
    attends to an indicator: the plain CLIP text feature is exactly unchanged.

    The CLIP modules are shared with (not copied from) the open_clip model passed in.
    """

    def __init__(self, clip: nn.Module, num_indicators: int, init_std: float = 0.02) -> None:
        super().__init__()
        text = getattr(clip, "text", None)
        parts = text if text is not None else clip  # CustomTextCLIP keeps a TextTransformer
        for name in ("token_embedding", "positional_embedding", "transformer", "ln_final"):
            if not hasattr(parts, name):
                raise TypeError(f"open_clip text tower lacks {name!r}: not a CLIP text transformer")
        if getattr(parts, "cls_emb", None) is not None:
            raise TypeError("text towers with an appended CLS embedding (CoCa) are not supported")
        if getattr(parts, "attn_mask", None) is None:
            raise TypeError("text towers without a causal mask are not supported")
        # A plain tuple keeps the CLIP modules out of this module's state_dict (they are
        # registered once, by the TokenBinder that owns the open_clip model).
        self._parts = (parts,)
        self.pool_type: str = getattr(parts, "text_pool_type", None) or getattr(
            parts, "pool_type", "argmax"
        )
        if self.pool_type not in ("argmax", "eos"):
            raise TypeError(f"text pool type {self.pool_type!r} is not supported (argmax, eos)")
        self.eos_id: int | None = getattr(parts, "text_eos_id", None) or getattr(
            parts, "eos_id", None
        )
        self.context_length: int = int(self.positional_embedding.shape[0])
        self.num_indicators = num_indicators
        if self.context_length - num_indicators < 3:
            raise ValueError(
                f"context length {self.context_length} leaves no room for {num_indicators} indicators"
            )
        # Indicators start as the EOT embedding + small noise (METHOD.md §1). With the argmax pool
        # the EOT id is the last row of the vocabulary.
        eot_id = self.eos_id if self.pool_type == "eos" else self.token_embedding.num_embeddings - 1
        width = self.token_embedding.embedding_dim
        with torch.no_grad():
            eot_embedding = self.token_embedding.weight[eot_id].detach().clone().float()
            noise = torch.randn(num_indicators, width) * init_std
        self.indicators = nn.Parameter(eot_embedding.unsqueeze(0) + noise)  # [m, W]
        self._packed = _PackedTower()

    @property
    def token_embedding(self) -> nn.Embedding:
        return self._parts[0].token_embedding

    @property
    def positional_embedding(self) -> torch.Tensor:
        return self._parts[0].positional_embedding

    @property
    def transformer(self) -> nn.Module:
        return self._parts[0].transformer

    @property
    def ln_final(self) -> nn.Module:
        return self._parts[0].ln_final

    @property
    def text_projection(self) -> nn.Module | torch.Tensor | None:
        return self._parts[0].text_projection

    @property
    def attn_mask(self) -> torch.Tensor:
        return self._parts[0].attn_mask

    @property
    def text_context_length(self) -> int:
        """Tokens left for the text itself (SOT + words + EOT) after the m indicators."""
        return self.context_length - self.num_indicators

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., W] -> [..., D]"""
        if self.text_projection is None:
            return x
        if isinstance(self.text_projection, nn.Linear):
            return self.text_projection(x)
        return x @ self.text_projection

    def forward(
        self, texts_tokens: torch.Tensor, *, truncate: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode tokenised texts.

        texts_tokens: [B, L'] int64 with L' <= context_length - m (SOT ... EOT, zero padded)
        returns (indicators [B, m, D] not normalised, eot_features [B, D] not normalised) where
        ``eot_features`` is the plain CLIP text feature (open_clip's ``encode_text``).

        ``truncate`` (the default) runs the transformer on the first ``max(eot) + m + 1``
        positions of the batch only: under the causal mask no later position can change any
        output read here (the EOT and the indicators), so the result is the full-context one up
        to float rounding, at a fraction of the cost for short texts. ``truncate=False`` runs
        all ``context_length`` positions, as open_clip does (kept for tests and benchmarks).
        """
        batch_size, length = texts_tokens.shape
        if length > self.text_context_length:
            raise ValueError(
                f"texts_tokens have {length} positions, at most {self.text_context_length} allowed"
            )
        cast_dtype = self.transformer.get_cast_dtype()
        full_tokens = F.pad(texts_tokens, (0, self.context_length - length))  # [B, L]
        eot = eot_positions(full_tokens, self.pool_type, self.eos_id)  # [B]
        positions = self.context_length
        if truncate:  # one host sync per batch: the longest text decides how many positions run
            positions = min(positions, int(eot.max()) + self.num_indicators + 1)
        tokens = full_tokens[:, :positions]  # [B, P]
        x = self.token_embedding(tokens).to(cast_dtype)  # [B, P, W]
        offsets = torch.arange(1, self.num_indicators + 1, device=x.device)  # [m]
        indicator_positions = eot.unsqueeze(1) + offsets.unsqueeze(0)  # [B, m]
        rows = torch.arange(batch_size, device=x.device).unsqueeze(1)  # [B, 1]
        indicators = self.indicators.to(cast_dtype).unsqueeze(0).expand(batch_size, -1, -1)
        x = x.index_put((rows.expand_as(indicator_positions), indicator_positions), indicators)
        x = x + self.positional_embedding[:positions].to(cast_dtype)  # [B, P, W]
        attn_mask = self.attn_mask[:positions, :positions]
        if truncate:
            x = self._transformer(x, attn_mask)  # [B, P, W]
        else:  # exactly open_clip's own call
            x = self.transformer(x, attn_mask=attn_mask)  # [B, P, W]
        x = self.ln_final(x)
        eot_features = self._project(x[rows.squeeze(1), eot])  # [B, D]
        indicator_states = x[rows, indicator_positions]  # [B, m, W]
        return self._project(indicator_states), eot_features

    def _transformer(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        """The text transformer on x [B, P, W]: with prepacked linear weights for CPU float32
        inference (no autograd, no autocast) when the ops and the block layout allow, else
        open_clip's own forward."""
        layers = self._packed_layers(x)
        if layers is None:
            return self.transformer(x, attn_mask=attn_mask)
        try:
            return _packed_forward(self.transformer.resblocks, layers, x, attn_mask)
        except RuntimeError as exc:  # an op this torch build lacks or refuses: fall back
            logger.warning("prepacked text transformer failed (%s); using open_clip's", exc)
            self._packed.broken = True
            return self.transformer(x, attn_mask=attn_mask)

    def _packed_layers(self, x: torch.Tensor) -> list[dict[str, Any]] | None:
        packed = self._packed
        if (
            packed.broken
            or x.device.type != "cpu"
            or x.dtype != torch.float32
            or torch.is_grad_enabled()
            or torch.is_autocast_enabled("cpu")
        ):
            return None
        blocks = _supported_blocks(self.transformer)
        if not blocks or not _packed_ops_available():
            packed.broken = True
            return None
        weights = [
            (
                block.attn.in_proj_weight,
                block.attn.out_proj.weight,
                block.mlp[0].weight,
                block.mlp[2].weight,
            )
            for block in blocks
        ]
        key = tuple((w.data_ptr(), w._version) for layer in weights for w in layer)
        if packed.key != key:
            try:
                packed.layers = [
                    {
                        name: torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1)
                        for name, weight in zip(("qkv", "out", "fc", "proj"), layer, strict=True)
                    }
                    for layer in weights
                ]
            except RuntimeError as exc:
                logger.warning("cannot prepack the text transformer's weights: %s", exc)
                packed.broken = True
                return None
            packed.key = key
        return packed.layers


def _packed_forward(
    blocks: Any, layers: list[dict[str, Any]], x: torch.Tensor, attn_mask: torch.Tensor
) -> torch.Tensor:
    """open_clip's ResidualAttentionBlock stack (pre-LN self-attention + MLP, residual) with the
    four linear layers of each block on prepacked weights. x [B, P, W] -> [B, P, W]"""
    batch_size, positions, width = x.shape

    def linear(inputs: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(inputs, weight, bias, "none", [], "")

    attn_mask = attn_mask.to(x.dtype)
    for block, packed in zip(blocks, layers, strict=True):
        attention = block.attn
        heads = attention.num_heads
        qkv = linear(block.ln_1(x), packed["qkv"], attention.in_proj_bias)  # [B, P, 3W]
        qkv = qkv.view(batch_size, positions, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=attn_mask)
        attended = attended.transpose(1, 2).reshape(batch_size, positions, width)
        x = x + block.ls_1(linear(attended, packed["out"], attention.out_proj.bias))
        mlp = block.mlp
        hidden = mlp.gelu(linear(block.ln_2(x), packed["fc"], mlp.c_fc.bias))
        x = x + block.ls_2(linear(hidden, packed["proj"], mlp.c_proj.bias))
    return x
