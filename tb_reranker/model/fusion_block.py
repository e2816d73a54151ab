"""One cross-attention block of the focused view: the fused indicators attend jointly over the K
candidates' T' tokens (docs/method.md, "Focused view").

The block has one attention computation (:meth:`CrossAttentionBlock.forward`). The candidates
come in one of two representations, each of which knows how to form the logits and pool the
values of that computation:

* :class:`ProjectedKV`: keys and values projected once per video (``project_kv``) and cached,
  the ``Reranker``'s warm path;
* :class:`TokenInputs`: the block's inputs ``ln_kv(tokens) + e_pos``, whose keys and values are
  never formed (the D×D work moves from the K·T' tokens to the Q queries), the cold path and
  training's.

Both give the same result up to float rounding, gradients included; the plain formulation they
are held to lives in the tests (``tests/unit/test_model_fusion.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["BlockOutput", "CrossAttentionBlock", "ProjectedKV", "TokenInputs", "gumbel_like"]

_FEW_CANDIDATES = 32  # B*K up to which all heads go in one block-diagonal bmm


def gumbel_like(x: torch.Tensor) -> torch.Tensor:
    """Standard Gumbel noise with the shape/dtype/device of ``x``."""
    uniform = torch.rand_like(x).clamp_(1e-9, 1.0 - 1e-9)
    return -torch.log(-torch.log(uniform))


@dataclass
class BlockOutput:
    """What one block computed for a batch of B queries against K candidates of T' tokens.

    ``queries [B, Q, D]`` (fused, the next block's input); ``logits [B, H, Q, K, T']`` (the
    logits the softmax read: scaled, noised, over tau, masked with -inf); ``attention`` (their
    softmax over the K·T' tokens) of the same shape; ``mass [B, H, Q, K]`` (the attention that
    went to each candidate); ``summary [B, K, Q, D]`` (each candidate's values averaged by the
    attention renormalised within it, heads concatenated; None when not asked for).
    """

    queries: torch.Tensor
    logits: torch.Tensor
    attention: torch.Tensor
    mass: torch.Tensor
    summary: torch.Tensor | None


class ProjectedKV(NamedTuple):
    """Candidates as projected keys and values, ``[B, K, T', D]`` each, read in place (a strided
    view of the cached K/V is fine)."""

    keys: torch.Tensor
    values: torch.Tensor

    def logits(self, block: CrossAttentionBlock, q: torch.Tensor) -> torch.Tensor:
        """Per-head dot products of q [B, H, Q, d] with the keys -> [B, H, Q, K, T'] (unscaled)."""
        batch_size, num_candidates, num_tokens, width = self.keys.shape
        keys = self.keys.reshape(batch_size, num_candidates * num_tokens, width)
        logits = _head_logits(q, keys, batch_size * num_candidates <= _FEW_CANDIDATES)
        return logits.view(*q.shape[:3], num_candidates, num_tokens)

    def summaries(self, block: CrossAttentionBlock, within: torch.Tensor) -> torch.Tensor:
        """within [B, H, Q, K, T'] (attention renormalised per candidate) -> [B, K, Q, D]"""
        batch_size, heads, num_queries, num_candidates, num_tokens = within.shape
        within = within.permute(0, 3, 1, 2, 4).reshape(
            batch_size * num_candidates, heads, num_queries, num_tokens
        )
        values = self.values.reshape(batch_size * num_candidates, num_tokens, -1)
        summary = _head_summaries(within, values, batch_size * num_candidates <= _FEW_CANDIDATES)
        return summary.view(batch_size, num_candidates, num_queries, -1)

    def attended(
        self, block: CrossAttentionBlock, attention: torch.Tensor, mass: torch.Tensor
    ) -> torch.Tensor:
        """``attention @ values`` [B, Q, D]: the per-candidate summaries, mixed by mass."""
        return _mix_candidates(mass, self.summaries(block, _within(attention, mass)))


class TokenInputs(NamedTuple):
    """Candidates as the block's K/V inputs ``x = ln_kv(tokens) + e_pos`` ``[B, K, T', D]``
    (:meth:`CrossAttentionBlock.kv_inputs`) and the rank embeddings ``[K, D]`` or None.

    With q_h head h's query and ``W_h``/``b_h`` head h's rows of a projection, a logit is
    ``q_h·(W_k,h x + b_k,h) = (W_k,hᵀ q_h)·x + q_h·b_k,h``: the keys are never formed. An attended
    value is ``Σ_t a_t (W_v,h x_t + b_v,h) = W_v,h (Σ_t a_t x_t) + (Σ_t a_t) b_v,h``: the values
    are never formed either. The rank embedding e_k rides along with x (``W (x + e_k) + b``, as
    in :meth:`CrossAttentionBlock.rank_kv`).
    """

    inputs: torch.Tensor
    rank_embeddings: torch.Tensor | None = None

    def logits(self, block: CrossAttentionBlock, q: torch.Tensor) -> torch.Tensor:
        """q [B, H, Q, d] -> logits [B, H, Q, K, T'] of the keys the inputs would project to."""
        batch_size, num_candidates, num_tokens, width = self.inputs.shape
        heads, num_queries, head_dim = q.shape[1], q.shape[2], q.shape[3]
        # u_{h,q} = W_k,hᵀ q_h: [H, B*Q, d] @ [H, d, D] -> [B, H*Q, D]
        key_weight = block.k_proj.weight.view(heads, head_dim, width)
        u = torch.bmm(
            q.transpose(0, 1).reshape(heads, batch_size * num_queries, head_dim), key_weight
        )
        u = u.view(heads, batch_size, num_queries, width).transpose(0, 1)
        u = u.reshape(batch_size, heads * num_queries, width)
        flat_inputs = self.inputs.reshape(batch_size, num_candidates * num_tokens, width)
        logits = torch.bmm(u, flat_inputs.transpose(1, 2))  # [B, H*Q, K*T']
        logits = logits.view(batch_size, heads, num_queries, num_candidates, num_tokens)
        # q_h·b_k,h shifts all of a query's logits alike (its softmax ignores it); it is added
        # anyway so that k_proj.bias stays in the graph (a parameter without a gradient breaks
        # DistributedDataParallel) and the logits are those of the projected keys
        shift = (q * block.k_proj.bias.view(heads, 1, head_dim)).sum(dim=-1)  # [B, H, Q]
        if self.rank_embeddings is None:
            return logits + shift[..., None, None]
        rank_logits = torch.matmul(u, self.rank_embeddings.t())  # [B, H*Q, K]: u·e_k
        shift = rank_logits.view(batch_size, heads, num_queries, num_candidates) + shift[..., None]
        return logits + shift.unsqueeze(-1)

    def summaries(self, block: CrossAttentionBlock, within: torch.Tensor) -> torch.Tensor:
        """within [B, H, Q, K, T'] (attention renormalised per candidate) -> [B, K, Q, D]"""
        batch_size, heads, num_queries, num_candidates, num_tokens = within.shape
        width = self.inputs.shape[-1]
        weight = within.sum(dim=-1).permute(0, 3, 2, 1)  # [B, K, Q, H]: 1, 0 when padded
        # pooled inputs are laid out [rows, Q, H, D] so that head h's rows are one strided
        # matrix (row stride H·D) that the value projection's bmm reads in place
        within = within.permute(0, 3, 2, 1, 4).reshape(
            batch_size * num_candidates, num_queries * heads, num_tokens
        )
        pooled = torch.bmm(
            within, self.inputs.reshape(batch_size * num_candidates, num_tokens, width)
        )  # [B*K, Q*H, D]: Σ_t within_t x_t
        pooled = pooled.view(batch_size, num_candidates, num_queries, heads, width)
        if self.rank_embeddings is not None:
            pooled = pooled + weight.unsqueeze(-1) * self.rank_embeddings[:, None, None]
        return block.project_values(pooled, weight)

    def attended(
        self, block: CrossAttentionBlock, attention: torch.Tensor, mass: torch.Tensor
    ) -> torch.Tensor:
        """``attention @ values`` [B, Q, D] in one pooling over all K·T' tokens."""
        batch_size, heads, num_queries, num_candidates, num_tokens = attention.shape
        width = self.inputs.shape[-1]
        flat_attention = attention.permute(0, 2, 1, 3, 4).reshape(
            batch_size, num_queries * heads, num_candidates * num_tokens
        )
        flat_inputs = self.inputs.reshape(batch_size, num_candidates * num_tokens, width)
        pooled = torch.bmm(flat_attention, flat_inputs)  # [B, Q*H, D]: Σ_{k,t} a x
        if self.rank_embeddings is not None:
            flat_mass = mass.transpose(1, 2).reshape(
                batch_size, num_queries * heads, num_candidates
            )
            pooled = pooled + torch.matmul(flat_mass, self.rank_embeddings)
        pooled = pooled.view(batch_size, 1, num_queries, heads, width)
        total = mass.sum(dim=-1).transpose(1, 2).unsqueeze(1)  # [B, 1, Q, H]
        return block.project_values(pooled, total).view(batch_size, num_queries, width)


Candidates = ProjectedKV | TokenInputs


class CrossAttentionBlock(nn.Module):
    """Pre-LN cross-attention (queries = indicators, K/V = candidate tokens) + FFN, residual.

    The K/V projection lives in :meth:`project_kv` so it can run once per video and be cached.
    """

    def __init__(self, width: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"fusion width {width} is not divisible by {heads} heads")
        self.width = width
        self.heads = heads
        self.head_dim = width // heads
        self.ln_q = nn.LayerNorm(width)
        self.ln_kv = nn.LayerNorm(width)
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)
        hidden = int(round(width * mlp_ratio))
        self.ln_mlp = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def kv_inputs(self, tokens: torch.Tensor, position_embeddings: torch.Tensor) -> torch.Tensor:
        """tokens [..., T', D], position_embeddings [T', D] -> ``ln_kv(tokens) + e_pos``, the
        input of the K/V projections (:meth:`project_kv`, :class:`TokenInputs`)."""
        return self.ln_kv(tokens) + position_embeddings

    def project_kv(self, tokens: torch.Tensor, position_embeddings: torch.Tensor) -> torch.Tensor:
        """tokens [N, T', D], position_embeddings [T', D] -> kv [N, 2, T', D]"""
        x = self.kv_inputs(tokens, position_embeddings)  # [N, T', D]
        return torch.stack([self.k_proj(x), self.v_proj(x)], dim=1)  # [N, 2, T', D]

    def rank_kv(self, rank_embeddings: torch.Tensor) -> torch.Tensor:
        """rank_embeddings [K, D] -> bias-free projections [2, K, D] to add to keys and values."""
        keys = F.linear(rank_embeddings, self.k_proj.weight)  # [K, D]
        values = F.linear(rank_embeddings, self.v_proj.weight)  # [K, D]
        return torch.stack([keys, values], dim=0)

    def forward(
        self,
        queries: torch.Tensor,
        candidates: Candidates,
        cand_mask: torch.Tensor | None = None,
        *,
        tau: float = 1.0,
        gumbel_scale: float = 0.0,
        tokens_mask: torch.Tensor | None = None,
        need_summary: bool = True,
    ) -> BlockOutput:
        """One block: the queries [B, Q, D] attend jointly over the K candidates' T' tokens.

        candidates: :class:`ProjectedKV` or :class:`TokenInputs`; cand_mask: [B, K] bool (True =
        real) or None; tokens_mask: [B, K, T'] bool (False = a padded frame's token: no
        attention) or None. tau: softmax temperature; gumbel_scale: multiplier of the Gumbel
        noise added to the scaled logits first (Gumbel-Softmax; 0 = deterministic softmax).

        The attended values are the per-candidate parts mixed: with ``mass_k`` the attention that
        went to candidate k and ``summary_k`` the values averaged by the attention renormalised
        within k, ``attention @ values = Σ_k mass_k summary_k``; the heads read both.
        ``need_summary=False`` skips the summaries (None in the output) where no head reads them.
        """
        q = self._head_queries(queries)  # [B, H, Q, d]
        logits, attention, mass = self._attention(
            candidates.logits(self, q), cand_mask, tau, gumbel_scale, tokens_mask
        )
        summary = None
        if need_summary:
            summary = candidates.summaries(self, _within(attention, mass))  # [B, K, Q, D]
            attended = _mix_candidates(mass, summary)
        else:
            attended = candidates.attended(self, attention, mass)
        queries = queries + self.out_proj(attended)
        queries = queries + self.mlp(self.ln_mlp(queries))
        return BlockOutput(queries, logits, attention, mass, summary)

    def _head_queries(self, queries: torch.Tensor) -> torch.Tensor:
        """queries [B, Q, D] -> projected per-head queries [B, H, Q, d]"""
        batch_size, num_queries, _ = queries.shape
        q = self.q_proj(self.ln_q(queries))  # [B, Q, D]
        return q.view(batch_size, num_queries, self.heads, self.head_dim).transpose(1, 2)

    def _attention(
        self,
        logits: torch.Tensor,
        cand_mask: torch.Tensor | None,
        tau: float,
        gumbel_scale: float,
        tokens_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Unscaled logits [B, H, Q, K, T'] -> (the logits the softmax reads, attention
        [B, H, Q, K, T'] (softmax over the K·T' tokens; 0 at padded candidates (``cand_mask``
        [B, K] False) and padded tokens (``tokens_mask`` [B, K, T'] False); all 0 for a query
        with no real token), mass [B, H, Q, K])."""
        batch_size, heads, num_queries, num_candidates, num_tokens = logits.shape
        logits = logits / math.sqrt(self.head_dim)
        if gumbel_scale > 0:
            logits = logits + gumbel_scale * gumbel_like(logits)
        logits = logits / tau
        keep = None if cand_mask is None else cand_mask.unsqueeze(-1)  # [B, K, 1]
        if tokens_mask is not None:
            keep = tokens_mask if keep is None else keep & tokens_mask  # [B, K, T']
        any_real = None
        if keep is not None:
            any_real = keep.reshape(batch_size, -1).any(dim=1).view(batch_size, 1, 1, 1, 1)
            logits = logits.masked_fill(~keep[:, None, None], float("-inf"))
            # a query with no real token at all would give NaN: zero attention instead
            logits = torch.where(any_real, logits, torch.zeros_like(logits))
        flat = logits.view(batch_size, heads, num_queries, num_candidates * num_tokens)
        attention = torch.softmax(flat, dim=-1).view_as(logits)  # [B, H, Q, K, T']
        if any_real is not None:
            attention = attention * any_real
        return logits, attention, attention.sum(dim=-1)

    def project_values(self, pooled: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Head h's value projection of head h's pooled inputs, plus its bias times the pooled
        attention: pooled [B, K', Q, H, D], weight [B, K', Q, H] -> [B, K', Q, D] (heads
        concatenated)."""
        batch_size, count, num_queries, heads, width = pooled.shape
        head_dim = self.head_dim
        value_weight = self.v_proj.weight.view(heads, head_dim, width)  # [H, d, D]
        rows = pooled.reshape(-1, heads, width).transpose(0, 1)  # [H, B*K'*Q, D], strided
        projected = torch.bmm(rows, value_weight.transpose(1, 2))  # [H, B*K'*Q, d]
        projected = projected.transpose(0, 1).view(batch_size, count, num_queries, heads, head_dim)
        bias = self.v_proj.bias.view(heads, head_dim)
        projected = projected + weight.unsqueeze(-1) * bias
        return projected.reshape(batch_size, count, num_queries, width)


def _within(attention: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
    """The attention renormalised within each candidate: [B, H, Q, K, T'] (0 where padded)."""
    return attention / mass.unsqueeze(-1).clamp_min(1e-12)


def _mix_candidates(mass: torch.Tensor, summary: torch.Tensor) -> torch.Tensor:
    """``attention @ values`` from the per-candidate parts: mass [B, H, Q, K], summary
    [B, K, Q, D] -> Σ_k mass_k summary_k [B, Q, D]."""
    batch_size, num_candidates, num_queries, width = summary.shape
    heads = mass.shape[1]
    weights = mass.permute(0, 3, 2, 1).unsqueeze(-1)  # [B, K, Q, H, 1]
    per_head = summary.view(batch_size, num_candidates, num_queries, heads, width // heads)
    return (weights * per_head).sum(dim=1).reshape(batch_size, num_queries, width)


def _head_logits(q: torch.Tensor, keys: torch.Tensor, few: bool) -> torch.Tensor:
    """Per-head dot products: q [B, H, Q, d], keys [B, S, D = H·d] -> [B, H, Q, S] (unscaled).

    Head h's keys are a strided column slice that BLAS reads in place (no re-layout of the large
    cached keys). With ``few`` candidates one bmm with block-diagonal queries [B, H·Q, D] (head
    h's q in head h's columns, exact zeros elsewhere) beats H small bmm calls.
    """
    batch_size, heads, num_queries, head_dim = q.shape
    if few:
        eye = torch.eye(heads, dtype=q.dtype, device=q.device)[None, :, None, :, None]
        block_queries = (q.unsqueeze(3) * eye).reshape(batch_size, heads * num_queries, -1)
        logits = torch.bmm(block_queries, keys.transpose(1, 2))  # [B, H*Q, S]
        return logits.view(batch_size, heads, num_queries, -1)
    return torch.stack(
        [
            torch.bmm(q[:, h], keys[:, :, h * head_dim : (h + 1) * head_dim].transpose(1, 2))
            for h in range(heads)
        ],
        dim=1,
    )


def _head_summaries(within: torch.Tensor, values: torch.Tensor, few: bool) -> torch.Tensor:
    """Per-candidate, per-head value averages: within [N, H, Q, T'], values [N, T', D = H·d]
    -> [N, Q, D] (heads concatenated). With ``few`` candidates one bmm over all heads, keeping
    the diagonal head blocks; else one bmm per head on a strided column slice of the values."""
    count, heads, num_queries, num_tokens = within.shape
    head_dim = values.shape[-1] // heads
    if few:
        summary = torch.bmm(within.reshape(count, heads * num_queries, num_tokens), values)
        summary = summary.view(count, heads, num_queries, heads, head_dim)
        summary = torch.diagonal(summary, dim1=1, dim2=3)  # [N, Q, d, H]
        return summary.transpose(2, 3).reshape(count, num_queries, heads * head_dim)
    return torch.stack(
        [
            torch.bmm(within[:, h], values[:, :, h * head_dim : (h + 1) * head_dim])
            for h in range(heads)
        ],
        dim=2,
    ).view(count, num_queries, heads * head_dim)
