"""The CLIP text tower with m learned query indicators appended after the end-of-text token."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["IndicatorTextEncoder", "eot_positions"]


def eot_positions(texts_tokens: torch.Tensor, pool_type: str, eos_id: int | None) -> torch.Tensor:
    """Index of the end-of-text token per row, as open_clip's ``text_global_pool`` finds it.

    texts_tokens: [B, L] int64 -> [B] int64
    """
    if pool_type == "eos":
        return (texts_tokens == eos_id).int().argmax(dim=-1)
    return texts_tokens.argmax(dim=-1)  # "argmax": CLIP's EOT id is the largest in the vocab


class IndicatorTextEncoder(nn.Module):
    """CLIP text encoder that also returns m query indicators I_1..I_m (docs/method.md §1).

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
        # Indicators start as the EOT embedding + small noise (docs/method.md §1). With the argmax pool
        # the EOT id is the last row of the vocabulary.
        eot_id = self.eos_id if self.pool_type == "eos" else self.token_embedding.num_embeddings - 1
        width = self.token_embedding.embedding_dim
        with torch.no_grad():
            eot_embedding = self.token_embedding.weight[eot_id].detach().clone().float()
            noise = torch.randn(num_indicators, width) * init_std
        self.indicators = nn.Parameter(eot_embedding.unsqueeze(0) + noise)  # [m, W]

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
        x = self.transformer(x, attn_mask=self.attn_mask[:positions, :positions])  # [B, P, W]
        x = self.ln_final(x)
        eot_features = self._project(x[rows.squeeze(1), eot])  # [B, D]
        indicator_states = x[rows, indicator_positions]  # [B, m, W]
        return self._project(indicator_states), eot_features
