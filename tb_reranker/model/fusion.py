"""Focused-view fusion (METHOD.md §3): indicators I_2..I_m attend jointly over K candidates' tokens.

Layout of the cacheable candidate side. For every fusion block b a video's tokens are turned into
keys and values on their own, independent of the query and of the other candidates::

    x_t   = LN_b(token_t) + e_pos[frame(t)]                 # [T', D]
    k_t   = W_k,b x_t + b_k,b ;  v_t = W_v,b x_t + b_v,b     # [T', D] each

``project_candidates`` returns these stacked as ``[N, n_blocks, 2, T', D]`` (T' = T, or
T·(1+P) with patch tokens). The rank embedding e_k of METHOD.md §3 is added *after* the
projection as ``W_k,b e_k`` / ``W_v,b e_k`` (the same matrices, no bias), which is exactly
``W (x_t + e_k) + b``: the paper's X = tokens + e_k + e_t, with the per-video part cacheable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FocusedScores", "FocusedFusion", "CrossAttentionBlock", "LISTWISE_HEADS"]

# heads with one output per rank slot (at most ``max_candidates`` candidates, rank embeddings)
LISTWISE_HEADS = ("listwise", "listwise_slots")

_FEW_CANDIDATES = 32  # B*K up to which all heads go in one block-diagonal bmm


@dataclass
class FocusedScores:
    """Scores of one batch of queries against their K candidates (all ``[B, K]`` float32).

    ``final = broad + delta``; padded candidates (``cand_mask`` False) have ``broad = final =
    -inf`` and ``delta = 0``. ``frame_attention [B, K, T]`` is the fused indicators' attention
    mass per candidate frame (mean over indicators and heads of the last block; sums to 1 over
    K·T per query), used to find the best-matching frame.
    """

    broad: torch.Tensor  # [B, K]
    delta: torch.Tensor  # [B, K]
    final: torch.Tensor  # [B, K]
    frame_attention: torch.Tensor  # [B, K, T]


def gumbel_like(x: torch.Tensor) -> torch.Tensor:
    """Standard Gumbel noise with the shape/dtype/device of ``x``."""
    uniform = torch.rand_like(x).clamp_(1e-9, 1.0 - 1e-9)
    return -torch.log(-torch.log(uniform))


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
        keys: torch.Tensor,
        values: torch.Tensor,
        cand_mask: torch.Tensor | None = None,
        *,
        tau: float = 1.0,
        gumbel_scale: float = 0.0,
        tokens_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """One block: the queries attend jointly over the K candidates' T' tokens.

        queries: [B, Q, D]; keys, values: [B, K, T', D] (read in place: a strided view of the
        cached K/V is fine); cand_mask: [B, K] bool (True = real) or None; tokens_mask:
        [B, K, T'] bool (False = a padded frame's token: no attention) or None. tau: softmax
        temperature; gumbel_scale: multiplier of the Gumbel noise added to the scaled logits
        first (Gumbel-Softmax; 0 = deterministic softmax).

        The attended values are computed per candidate: with ``mass_k`` the attention that went
        to candidate k and ``summary_k`` the values averaged by the attention renormalised within
        k, ``attention @ values = sum_k mass_k * summary_k``; the symmetric head reuses both.
        returns (queries [B, Q, D], attention [B, H, Q, K, T'], mass [B, H, Q, K],
        summary [B, K, Q, D] (heads concatenated))
        """
        batch_size, num_candidates, num_tokens, width = keys.shape
        num_queries, heads = queries.shape[1], self.heads
        few = batch_size * num_candidates <= _FEW_CANDIDATES
        q = self._head_queries(queries)  # [B, H, Q, d]
        keys = keys.reshape(batch_size, num_candidates * num_tokens, width)  # [B, K*T', D]
        logits = _head_logits(q, keys, few)  # [B, H, Q, K*T']
        logits = logits.view(batch_size, heads, num_queries, num_candidates, num_tokens)
        attention, mass = self._attention(logits, cand_mask, tau, gumbel_scale, tokens_mask)
        within = attention / mass.unsqueeze(-1).clamp_min(1e-12)  # [B, H, Q, K, T']
        within = within.permute(0, 3, 1, 2, 4).reshape(
            batch_size * num_candidates, heads, num_queries, num_tokens
        )
        values = values.reshape(batch_size * num_candidates, num_tokens, width)
        summary = _head_summaries(within, values, few)  # [B*K, Q, D]
        summary = summary.view(batch_size, num_candidates, num_queries, width)
        return self._finish(queries, _mix_candidates(mass, summary)), attention, mass, summary

    def forward_tokens(
        self,
        queries: torch.Tensor,
        inputs: torch.Tensor,
        cand_mask: torch.Tensor | None = None,
        rank_embeddings: torch.Tensor | None = None,
        *,
        tau: float = 1.0,
        gumbel_scale: float = 0.0,
        need_summary: bool = True,
        tokens_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """:meth:`forward` without projecting the candidates' tokens (the K/V-free path).

        inputs: [B, K, T', D], the block's ``ln_kv(tokens) + e_pos`` (see
        :meth:`kv_inputs`); rank_embeddings: [K, D] or None. With q_h head h's query and
        ``W_h``/``b_h`` head h's rows of a projection, a logit is ``q_h·(W_k,h x + b_k,h)
        = (W_k,hᵀ q_h)·x + q_h·b_k,h``: the keys are never formed. An attended value is
        ``Σ_t a_t (W_v,h x_t + b_v,h) = W_v,h (Σ_t a_t x_t) + (Σ_t a_t) b_v,h``: the D×D work
        moves from the K·T' tokens to the Q queries (or the K·Q summaries). The rank embedding
        e_k rides along with x (``W (x + e_k) + b``, as in :meth:`rank_kv`). Equal to
        :meth:`forward` on ``project_kv`` + ``rank_kv`` up to float rounding, gradients included.
        ``need_summary=False`` skips the per-candidate summaries (returned as None): only the
        symmetric head's last block reads them. ``tokens_mask``: as in :meth:`forward` (the
        scores ``(W_kᵀ q)·x + q·b`` of padded tokens are masked before the softmax)."""
        batch_size, num_candidates, num_tokens, width = inputs.shape
        num_queries, heads, head_dim = queries.shape[1], self.heads, self.head_dim
        q = self._head_queries(queries)  # [B, H, Q, d]
        # u_{h,q} = W_k,hᵀ q_h: [H, B*Q, d] @ [H, d, D] -> [B, H*Q, D]
        key_weight = self.k_proj.weight.view(heads, head_dim, width)
        u = torch.bmm(
            q.transpose(0, 1).reshape(heads, batch_size * num_queries, head_dim), key_weight
        )
        u = u.view(heads, batch_size, num_queries, width).transpose(0, 1)
        u = u.reshape(batch_size, heads * num_queries, width)
        flat_inputs = inputs.reshape(batch_size, num_candidates * num_tokens, width)
        logits = torch.bmm(u, flat_inputs.transpose(1, 2))  # [B, H*Q, K*T']
        logits = logits.view(batch_size, heads, num_queries, num_candidates, num_tokens)
        # q_h·b_k,h shifts all of a query's logits alike (its softmax ignores it); it is added
        # anyway so that k_proj.bias stays in the graph (a parameter without a gradient breaks
        # DistributedDataParallel) and the logits are those of the projected keys
        shift = (q * self.k_proj.bias.view(heads, 1, head_dim)).sum(dim=-1)  # [B, H, Q]
        if rank_embeddings is not None:  # u·e_k, the same for every token of candidate k
            rank_logits = torch.matmul(u, rank_embeddings.t())  # [B, H*Q, K]
            shift = (
                rank_logits.view(batch_size, heads, num_queries, num_candidates) + shift[..., None]
            )
            logits = logits + shift.unsqueeze(-1)
        else:
            logits = logits + shift[..., None, None]
        attention, mass = self._attention(logits, cand_mask, tau, gumbel_scale, tokens_mask)
        # pooled inputs are laid out [rows, Q, H, D] so that head h's rows are one strided
        # matrix (row stride H·D) that the value projection's bmm reads in place
        if need_summary:
            within = attention / mass.unsqueeze(-1).clamp_min(1e-12)  # [B, H, Q, K, T']
            weight = within.sum(dim=-1).permute(0, 3, 2, 1)  # [B, K, Q, H]: 1, 0 when padded
            within = within.permute(0, 3, 2, 1, 4).reshape(
                batch_size * num_candidates, num_queries * heads, num_tokens
            )
            pooled = torch.bmm(
                within, inputs.reshape(batch_size * num_candidates, num_tokens, width)
            )  # [B*K, Q*H, D]: Σ_t within_t x_t
            pooled = pooled.view(batch_size, num_candidates, num_queries, heads, width)
            if rank_embeddings is not None:
                pooled = pooled + weight.unsqueeze(-1) * rank_embeddings[:, None, None]
            summary = self._project_values(pooled, weight)  # [B, K, Q, D]
            return self._finish(queries, _mix_candidates(mass, summary)), attention, mass, summary
        flat_attention = attention.permute(0, 2, 1, 3, 4).reshape(
            batch_size, num_queries * heads, num_candidates * num_tokens
        )
        pooled = torch.bmm(flat_attention, flat_inputs)  # [B, Q*H, D]: Σ_{k,t} a x
        if rank_embeddings is not None:
            flat_mass = mass.transpose(1, 2).reshape(
                batch_size, num_queries * heads, num_candidates
            )
            pooled = pooled + torch.matmul(flat_mass, rank_embeddings)
        pooled = pooled.view(batch_size, 1, num_queries, heads, width)
        total = mass.sum(dim=-1).transpose(1, 2).unsqueeze(1)  # [B, 1, Q, H]
        attended = self._project_values(pooled, total).view(batch_size, num_queries, width)
        return self._finish(queries, attended), attention, mass, None

    def kv_inputs(self, tokens: torch.Tensor, position_embeddings: torch.Tensor) -> torch.Tensor:
        """tokens [..., T', D], position_embeddings [T', D] -> ``ln_kv(tokens) + e_pos``, the
        input of the K/V projections (:meth:`project_kv`) and of :meth:`forward_tokens`."""
        return self.ln_kv(tokens) + position_embeddings

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
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Unscaled logits [B, H, Q, K, T'] -> (attention [B, H, Q, K, T'] (softmax over the
        K·T' tokens; 0 at padded candidates (``cand_mask`` [B, K] False) and padded tokens
        (``tokens_mask`` [B, K, T'] False); all 0 for a query with no real token), mass
        [B, H, Q, K])."""
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
        return attention, attention.sum(dim=-1)

    def _project_values(self, pooled: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
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

    def _finish(self, queries: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """Residual output projection and FFN: queries, attended [B, Q, D] -> queries [B, Q, D]"""
        queries = queries + self.out_proj(attended)
        return queries + self.mlp(self.ln_mlp(queries))


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


class FocusedFusion(nn.Module):
    """Cross-attention fusion + a Δ head. Pure function of its inputs (no I/O).

    Heads:
      * ``listwise`` (paper): Δ_1..Δ_K = MLP(concat(Ĩ_2..Ĩ_m)), K = ``max_candidates`` outputs.
      * ``listwise_slots``: the same K-output MLP fed the per-candidate features below of all
        K slots, in rank order (slot k's input is candidate k's own): the smallest change that
        binds the paper's K outputs to slots (docs/method.md).
      * ``symmetric``: Δ_k = MLP(features of candidate k) with one shared MLP, where the
        features of k are, per fused indicator q, ``Ĩ_q ⊙ s_{q,k}`` (s = the candidate's
        attended value summary, attention renormalised within k) and ``K_real · mass_{q,k}``
        (the share of the joint attention that went to k; 1 when uniform over real candidates).
        Permutation-equivariant when no rank embedding is used.
    The last layer of either head is zero-initialised: an untrained head gives Δ = 0 exactly.
    One forward serves training and inference (it is differentiable); the Gumbel noise is only
    added in training mode.
    """

    def __init__(
        self,
        width: int,
        num_queries: int,
        max_frames: int,
        max_candidates: int,
        *,
        blocks: int = 1,
        heads: int = 8,
        mlp_ratio: float = 4.0,
        head: str = "symmetric",
        head_hidden: int = 0,
        rank_embedding: bool = False,
        tokens_per_frame: int = 1,
        gumbel_tau: float = 1.0,
        gumbel_scale: float = 0.3,
    ) -> None:
        super().__init__()
        self.width = width
        self.num_queries = num_queries
        self.max_frames = max_frames
        self.max_candidates = max_candidates
        self.head_type = head
        self.tokens_per_frame = tokens_per_frame
        self.gumbel_tau = gumbel_tau
        self.gumbel_scale = gumbel_scale
        self.blocks = nn.ModuleList(
            [CrossAttentionBlock(width, heads, mlp_ratio) for _ in range(blocks)]
        )
        self.frame_position_embedding = nn.Parameter(torch.randn(max_frames, width) * 0.02)
        self.rank_embedding = (
            nn.Parameter(torch.randn(max_candidates, width) * 0.02) if rank_embedding else None
        )
        hidden = head_hidden or width
        if head == "listwise":
            in_features = num_queries * width
            out_features = max_candidates
        elif head == "listwise_slots":
            # the paper's K-output MLP, fed per-slot features (those of the symmetric head) of
            # all K slots in rank order instead of the K-pooled fused indicators
            in_features = max_candidates * num_queries * (width + 1)
            out_features = max_candidates
        elif head == "symmetric":
            in_features = num_queries * (width + 1)
            out_features = 1
        else:
            raise ValueError(f"unknown head {head!r}")
        self.head = nn.Sequential(
            nn.LayerNorm(in_features),
            nn.Linear(in_features, hidden),
            nn.GELU(),
            nn.Linear(hidden, out_features),
        )
        nn.init.zeros_(self.head[-1].weight)
        nn.init.zeros_(self.head[-1].bias)

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def position_embeddings(self, num_tokens: int) -> torch.Tensor:
        """Frame-position embedding of each token of one video: [T', D] (T' = T·tokens_per_frame)."""
        frames_index = torch.arange(num_tokens, device=self.frame_position_embedding.device)
        frames_index = frames_index // self.tokens_per_frame
        return self.frame_position_embedding[frames_index]

    def tokens_mask(self, frames_mask: torch.Tensor | None) -> torch.Tensor | None:
        """Per-frame mask [..., T] -> per-token mask [..., T·tokens_per_frame] (None stays None)."""
        if frames_mask is None or self.tokens_per_frame == 1:
            return frames_mask
        return frames_mask.repeat_interleave(self.tokens_per_frame, dim=-1)

    def project_candidates(
        self, frames_tokens: torch.Tensor, frames_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Per-video K/V, independent of the query and the other candidates.

        frames_tokens: [N, T', D]; frames_mask: [N, T] bool (False = padded frame) or None
        -> kv [N, n_blocks, 2, T', D]. With a mask the padded frames' tokens are not projected:
        their K/V are zero, so score them with the same mask (``forward``'s ``frames_mask``),
        which gives them no attention anyway.
        """
        positions = self.position_embeddings(frames_tokens.shape[1])
        keep = self.tokens_mask(frames_mask)
        if keep is None or bool(keep.all()):
            return torch.stack(
                [block.project_kv(frames_tokens, positions) for block in self.blocks], 1
            )
        rows, cols = keep.nonzero(as_tuple=True)  # the real tokens only
        real_tokens, real_positions = frames_tokens[rows, cols], positions[cols]  # [R, D] each
        num_videos, num_tokens, width = frames_tokens.shape
        per_block = []
        for block in self.blocks:
            x = block.kv_inputs(real_tokens, real_positions)  # [R, D]
            per_block.append(torch.stack([block.k_proj(x), block.v_proj(x)], 1))
        projected = torch.stack(per_block, dim=1)  # [R, n_blocks, 2, D] (autocast's dtype)
        kv = projected.new_zeros(num_videos, num_tokens, self.num_blocks, 2, width)
        kv = kv.index_put((rows, cols), projected)
        return kv.permute(0, 2, 3, 1, 4).contiguous()  # [N, n_blocks, 2, T', D]

    def forward(
        self,
        queries: torch.Tensor,
        cand_kv: torch.Tensor | None = None,
        cand_mask: torch.Tensor | None = None,
        *,
        cand_tokens: torch.Tensor | None = None,
        frames_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Δ scores and attention, from cached K/V or straight from the candidates' tokens.

        queries: [B, Q, D] (indicators I_2..I_m); exactly one of cand_kv: [B, K, n_blocks, 2,
        T', D] (``project_candidates`` output, read in place: a free view when it is a permuted
        ``[n_blocks, 2, B*K, T', D]`` gather, as the ``Reranker`` passes it) and cand_tokens:
        [B, K, T', D] (the stored frame tokens: the K/V are never formed, see
        :meth:`CrossAttentionBlock.forward_tokens`; the cheap path for uncached candidates);
        cand_mask: [B, K] bool or None; frames_mask: [B, K, T] bool (False = a padded frame of
        a short video: its tokens get no attention, as if absent) or None. Both paths give the
        same result up to float rounding.
        returns (delta [B, K] (0 at padded candidates), token_attention [B, K, T'] (0 at padded
        candidates and frames))
        """
        if (cand_kv is None) == (cand_tokens is None):
            raise ValueError("give exactly one of cand_kv and cand_tokens")
        source = cand_kv if cand_kv is not None else cand_tokens
        assert source is not None
        num_candidates = source.shape[1]
        if self.head_type in LISTWISE_HEADS and num_candidates > self.max_candidates:
            raise ValueError(f"listwise head scores at most {self.max_candidates} candidates")
        gumbel_scale = self.gumbel_scale if self.training else 0.0
        rank_embeddings = (
            None if self.rank_embedding is None else self.rank_embedding[:num_candidates]
        )
        tokens_mask = self.tokens_mask(frames_mask)
        attention = mass = summary = None
        if cand_tokens is not None:
            positions = self.position_embeddings(cand_tokens.shape[2])
            last = self.num_blocks - 1
            for index, block in enumerate(self.blocks):
                queries, attention, mass, summary = block.forward_tokens(
                    queries,
                    block.kv_inputs(cand_tokens, positions),
                    cand_mask,
                    rank_embeddings,
                    tau=self.gumbel_tau,
                    gumbel_scale=gumbel_scale,
                    need_summary=index == last and self.head_type != "listwise",
                    tokens_mask=tokens_mask,
                )
        else:
            assert cand_kv is not None
            for index, block in enumerate(self.blocks):
                keys = cand_kv[:, :, index, 0]  # [B, K, T', D]
                values = cand_kv[:, :, index, 1]  # [B, K, T', D]
                if rank_embeddings is not None:
                    rank = block.rank_kv(rank_embeddings)  # [2, K, D]
                    keys = keys + rank[0][None, :, None, :]
                    values = values + rank[1][None, :, None, :]
                queries, attention, mass, summary = block(
                    queries,
                    keys,
                    values,
                    cand_mask,
                    tau=self.gumbel_tau,
                    gumbel_scale=gumbel_scale,
                    tokens_mask=tokens_mask,
                )
        assert attention is not None and mass is not None
        token_attention = attention.mean(dim=(1, 2))  # [B, K, T']
        if self.head_type == "listwise":
            delta = self.head(queries.flatten(1))[:, :num_candidates]
        elif self.head_type == "listwise_slots":
            assert summary is not None
            delta = self._slots_delta(queries, mass, summary, cand_mask)
        else:
            assert summary is not None
            delta = self._symmetric_delta(queries, mass, summary, cand_mask)
        if cand_mask is not None:
            delta = delta.masked_fill(~cand_mask, 0.0)
        return delta, token_attention  # [B, K], [B, K, T']

    def _candidate_features(
        self,
        queries: torch.Tensor,
        mass: torch.Tensor,
        summary: torch.Tensor,
        cand_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """Per-candidate features, per fused indicator q: ``Ĩ_q ⊙ s_{q,k}`` and ``K_real ·
        mass_{q,k}``: queries [B, Q, D], mass [B, H, Q, K], summary [B, K, Q, D] -> [B, K, Q, D+1]
        """
        batch_size, num_candidates = summary.shape[:2]
        products = queries.unsqueeze(1) * summary  # [B, K, Q, D]
        if cand_mask is None:
            real: float | torch.Tensor = float(num_candidates)
        else:
            real = cand_mask.sum(dim=1).to(mass.dtype).view(batch_size, 1, 1)
        mass_feature = mass.mean(dim=1) * real  # [B, Q, K], 1 when uniform over real candidates
        return torch.cat([products, mass_feature.transpose(1, 2).unsqueeze(-1)], dim=-1)

    def _slots_delta(
        self,
        queries: torch.Tensor,
        mass: torch.Tensor,
        summary: torch.Tensor,
        cand_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """The ``listwise_slots`` head: one K-output MLP over the features of all K slots, in
        rank order (padded and missing slots are zeros) -> Δ [B, K]."""
        features = self._candidate_features(queries, mass, summary, cand_mask)  # [B, K, Q, D+1]
        batch_size, num_candidates = features.shape[:2]
        if cand_mask is not None:
            features = features * cand_mask[:, :, None, None].to(features.dtype)
        if num_candidates < self.max_candidates:
            features = F.pad(features, (0, 0, 0, 0, 0, self.max_candidates - num_candidates))
        return self.head(features.reshape(batch_size, -1))[:, :num_candidates]

    def _symmetric_delta(
        self,
        queries: torch.Tensor,
        mass: torch.Tensor,
        summary: torch.Tensor,
        cand_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """The symmetric head on the last block's outputs.

        queries [B, Q, D] (fused), mass [B, H, Q, K], summary [B, K, Q, D] -> Δ [B, K]
        """
        features = self._candidate_features(queries, mass, summary, cand_mask)  # [B, K, Q, D+1]
        batch_size, num_candidates = features.shape[:2]
        features = features.reshape(batch_size * num_candidates, -1)
        return self.head(features).view(batch_size, num_candidates)
