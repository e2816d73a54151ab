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
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FocusedScores", "FocusedFusion", "CrossAttentionBlock"]

_FEW_CANDIDATES = 32  # B*K up to which the eval path uses one block-diagonal bmm over heads


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
        x = self.ln_kv(tokens) + position_embeddings  # [N, T', D]
        return torch.stack([self.k_proj(x), self.v_proj(x)], dim=1)  # [N, 2, T', D]

    def rank_kv(self, rank_embeddings: torch.Tensor) -> torch.Tensor:
        """rank_embeddings [K, D] -> bias-free projections [2, K, D] to add to keys and values."""
        keys = F.linear(rank_embeddings, self.k_proj.weight)  # [K, D]
        values = F.linear(rank_embeddings, self.v_proj.weight)  # [K, D]
        return torch.stack([keys, values], dim=0)

    def forward(
        self,
        queries: torch.Tensor,
        kv: torch.Tensor,
        tokens_mask: torch.Tensor | None,
        tau: float = 1.0,
        gumbel_scale: float = 0.0,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One block.

        queries: [B, Q, D]; kv: [B, 2, S, D] (S = K·T'); tokens_mask: [B, S] bool (True = real)
        tau: softmax temperature; gumbel_scale: multiplier of the Gumbel noise added to the
        logits first (Gumbel-Softmax; 0 = deterministic softmax).
        returns (queries [B, Q, D], attention [B, H, Q, S], values [B, H, S, D/H])
        """
        batch_size, num_queries, _ = queries.shape
        num_tokens = kv.shape[2]
        q = self.q_proj(self.ln_q(queries))  # [B, Q, D]
        q = q.view(batch_size, num_queries, self.heads, self.head_dim).transpose(1, 2)
        k = kv[:, 0].view(batch_size, num_tokens, self.heads, self.head_dim).transpose(1, 2)
        v = kv[:, 1].view(batch_size, num_tokens, self.heads, self.head_dim).transpose(1, 2)
        logits = (q @ k.transpose(-1, -2)) / math.sqrt(self.head_dim)  # [B, H, Q, S]
        if gumbel_scale > 0:
            logits = logits + gumbel_scale * gumbel_like(logits)
        logits = logits / tau
        if tokens_mask is not None:
            keep = tokens_mask[:, None, None, :]  # [B, 1, 1, S]
            logits = logits.masked_fill(~keep, float("-inf"))
            # a row with no real token at all would give NaN: give it zero attention instead
            any_real = keep.any(dim=-1, keepdim=True)
            logits = torch.where(any_real, logits, torch.zeros_like(logits))
            attention = torch.softmax(logits, dim=-1) * any_real
        else:
            attention = torch.softmax(logits, dim=-1)  # [B, H, Q, S]
        attended = attention @ v  # [B, H, Q, D/H]
        attended = attended.transpose(1, 2).reshape(batch_size, num_queries, self.width)
        queries = queries + self.out_proj(attended)
        queries = queries + self.mlp(self.ln_mlp(queries))
        return queries, attention, v


class FocusedFusion(nn.Module):
    """Cross-attention fusion + a Δ head. Pure function of its inputs (no I/O).

    Heads:
      * ``listwise`` (paper): Δ_1..Δ_K = MLP(concat(Ĩ_2..Ĩ_m)), K = ``max_candidates`` outputs.
      * ``symmetric``: Δ_k = MLP(features of candidate k) with one shared MLP, where the
        features of k are, per fused indicator q, ``Ĩ_q ⊙ s_{q,k}`` (s = the candidate's
        attended value summary, attention renormalised within k) and ``K_real · mass_{q,k}``
        (the share of the joint attention that went to k; 1 when uniform over real candidates). Permutation-equivariant when no rank
        embedding is used.
    The last layer of either head is zero-initialised: an untrained head gives Δ = 0 exactly.
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
        # inference-only copies of transposed weights (plain attribute: not in the state dict)
        self._transposed: dict[int, tuple[tuple[Any, ...], torch.Tensor]] = {}

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def position_embeddings(self, num_tokens: int) -> torch.Tensor:
        """Frame-position embedding of each token of one video: [T', D] (T' = T·tokens_per_frame)."""
        frames_index = torch.arange(num_tokens, device=self.frame_position_embedding.device)
        frames_index = frames_index // self.tokens_per_frame
        return self.frame_position_embedding[frames_index]

    def project_candidates(self, frames_tokens: torch.Tensor) -> torch.Tensor:
        """Per-video K/V, independent of the query and the other candidates.

        frames_tokens: [N, T', D] -> kv [N, n_blocks, 2, T', D]
        """
        positions = self.position_embeddings(frames_tokens.shape[1])
        return torch.stack([block.project_kv(frames_tokens, positions) for block in self.blocks], 1)

    def forward(
        self,
        queries: torch.Tensor,
        cand_kv: torch.Tensor,
        cand_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Δ scores and attention.

        queries: [B, Q, D] (indicators I_2..I_m); cand_kv: [B, K, n_blocks, 2, T', D];
        cand_mask: [B, K] bool or None.
        returns (delta [B, K] (0 at padded candidates), token_attention [B, K, T'])
        """
        batch_size, num_candidates, _, _, num_tokens, width = cand_kv.shape
        if not self.training and not torch.is_grad_enabled():
            return self._forward_inference(queries, cand_kv, cand_mask)
        tokens_mask = None
        if cand_mask is not None:
            tokens_mask = cand_mask.unsqueeze(-1).expand(-1, -1, num_tokens)
            tokens_mask = tokens_mask.reshape(batch_size, num_candidates * num_tokens)  # [B, S]
        attention = values = None
        for index, block in enumerate(self.blocks):
            kv = cand_kv[:, :, index]  # [B, K, 2, T', D]
            if self.rank_embedding is not None:
                rank = block.rank_kv(self.rank_embedding[:num_candidates])  # [2, K, D]
                kv = kv + rank.transpose(0, 1).unsqueeze(0).unsqueeze(3)  # [1, K, 2, 1, D]
            kv = kv.transpose(1, 2).reshape(batch_size, 2, num_candidates * num_tokens, width)
            queries, attention, values = block(
                queries,
                kv,
                tokens_mask,
                tau=self.gumbel_tau,
                gumbel_scale=self.gumbel_scale if self.training else 0.0,
            )
        assert attention is not None and values is not None
        heads = attention.shape[1]
        # attention [B, H, Q, K*T'] -> per candidate [B, H, Q, K, T']
        per_candidate = attention.view(batch_size, heads, -1, num_candidates, num_tokens)
        token_attention = per_candidate.mean(dim=(1, 2))  # [B, K, T']
        if self.head_type == "listwise":
            if num_candidates > self.max_candidates:
                raise ValueError(f"listwise head scores at most {self.max_candidates} candidates")
            delta = self.head(queries.reshape(batch_size, -1))[:, :num_candidates]  # [B, K]
        else:
            mass = per_candidate.sum(dim=-1)  # [B, H, Q, K]
            within = per_candidate / mass.unsqueeze(-1).clamp_min(1e-12)  # [B, H, Q, K, T']
            values_per_candidate = values.view(batch_size, heads, num_candidates, num_tokens, -1)
            # summary s_{q,k} per head: sum_t within[b,h,q,k,t] * v[b,h,k,t,:]
            summary = torch.einsum("bhqkt,bhktd->bqkhd", within, values_per_candidate)
            summary = summary.reshape(batch_size, -1, num_candidates, width)  # [B, Q, K, D]
            products = queries.unsqueeze(2) * summary  # [B, Q, K, D]
            if cand_mask is None:
                real = torch.full((batch_size, 1, 1), float(num_candidates), device=mass.device)
            else:
                real = cand_mask.sum(dim=1).to(mass.dtype).view(batch_size, 1, 1)
            mass_feature = (mass.mean(dim=1) * real).unsqueeze(-1)  # [B, Q, K, 1], uniform = 1
            features = torch.cat([products, mass_feature], dim=-1)  # [B, Q, K, D+1]
            features = features.permute(0, 2, 1, 3).reshape(batch_size, num_candidates, -1)
            delta = self.head(features).squeeze(-1)  # [B, K]
        if cand_mask is not None:
            delta = delta.masked_fill(~cand_mask, 0.0)
        return delta, token_attention

    def _forward_inference(
        self,
        queries: torch.Tensor,
        cand_kv: torch.Tensor,
        cand_mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``forward`` without autograd: the same arithmetic, fewer copies (the rerank hot path).

        Taken by ``forward`` in eval mode with autograd off. Keys/values are read in place as
        ``[B, K*T', D]`` (a free view when ``cand_kv`` is a permuted ``[n_blocks, 2, B*K, T',
        D]`` gather, as the ``Reranker`` passes it) and each head's slice goes to BLAS as a
        strided matrix (no per-head re-layout copies); the per-candidate summaries come from
        batched matmuls over B*K and the attended values are ``sum_k mass_k * summary_k``
        (= attention @ values). With few candidates (B*K <= ``_FEW_CANDIDATES``) the heads are
        done in one bmm with block-diagonal operands instead of H small ones. The symmetric
        head's first linear runs on a cached pre-transposed weight. Same numbers as the autograd
        path to ~1e-6.
        queries: [B, Q, D]; cand_kv: [B, K, n_blocks, 2, T', D]; cand_mask: [B, K] bool or None.
        returns (delta [B, K], token_attention [B, K, T'])
        """
        batch_size, num_candidates, _, _, num_tokens, width = cand_kv.shape
        num_queries = queries.shape[1]
        keep = None
        if cand_mask is not None:
            keep = cand_mask[:, None, None, :, None]  # [B, 1, 1, K, 1]
            any_real = cand_mask.any(dim=1).view(batch_size, 1, 1, 1, 1)  # [B, 1, 1, 1, 1]
        attention = summary = None
        for index, block in enumerate(self.blocks):
            heads, head_dim = block.heads, block.head_dim
            keys = cand_kv[:, :, index, 0]  # [B, K, T', D]
            values = cand_kv[:, :, index, 1]  # [B, K, T', D]
            if self.rank_embedding is not None:
                rank = block.rank_kv(self.rank_embedding[:num_candidates])  # [2, K, D]
                keys = keys + rank[0][None, :, None, :]
                values = values + rank[1][None, :, None, :]
            q = block.q_proj(block.ln_q(queries))  # [B, Q, D]
            q = q.view(batch_size, num_queries, heads, head_dim).transpose(1, 2)  # [B, H, Q, d]
            # per head: q_h [B, Q, d] @ k_h^T [B, d, K*T'], k_h a strided column slice of the
            # keys (BLAS reads it in place: no re-layout of the large cached keys)
            keys = keys.reshape(batch_size, num_candidates * num_tokens, width)  # [B, K*T', D]
            small = batch_size * num_candidates <= _FEW_CANDIDATES
            if small:
                # few candidates: one bmm with block-diagonal queries [B, H*Q, D] (head h's q in
                # head h's columns, exact zeros elsewhere) beats H small bmm calls
                eye = torch.eye(heads, dtype=q.dtype, device=q.device)[None, :, None, :, None]
                block_queries = (q.unsqueeze(3) * eye).reshape(
                    batch_size, heads * num_queries, width
                )
                logits = torch.bmm(block_queries, keys.transpose(1, 2))  # [B, H*Q, K*T']
            else:
                logits = torch.stack(
                    [
                        torch.bmm(
                            q[:, h], keys[:, :, h * head_dim : (h + 1) * head_dim].transpose(1, 2)
                        )
                        for h in range(heads)
                    ],
                    dim=1,
                )  # [B, H, Q, K*T']
            logits = logits.view(batch_size, heads, num_queries, num_candidates, num_tokens)
            logits = logits / math.sqrt(head_dim) / self.gumbel_tau
            if keep is not None:
                logits = logits.masked_fill(~keep, float("-inf"))
                logits = torch.where(any_real, logits, torch.zeros_like(logits))
            flat = logits.view(batch_size, heads, num_queries, num_candidates * num_tokens)
            attention = torch.softmax(flat, dim=-1).view_as(logits)  # [B, H, Q, K, T']
            if keep is not None:
                attention = attention * any_real
            mass = attention.sum(dim=-1)  # [B, H, Q, K]
            within = attention / mass.unsqueeze(-1).clamp_min(1e-12)  # [B, H, Q, K, T']
            # summary per candidate and head: within_h [B*K, Q, T'] @ v_h [B*K, T', d]
            within = within.permute(0, 3, 1, 2, 4).reshape(
                batch_size * num_candidates, heads, num_queries, num_tokens
            )
            values = values.reshape(batch_size * num_candidates, num_tokens, width)
            if small:  # one bmm over all heads, keeping the diagonal head blocks
                summary = torch.bmm(
                    within.reshape(batch_size * num_candidates, heads * num_queries, num_tokens),
                    values,
                ).view(batch_size * num_candidates, heads, num_queries, heads, head_dim)
                summary = torch.diagonal(summary, dim1=1, dim2=3)  # [B*K, Q, d, H]
                summary = summary.transpose(2, 3).reshape(
                    batch_size, num_candidates, num_queries, width
                )  # [B, K, Q, D], heads concatenated
            else:
                summary = torch.stack(
                    [
                        torch.bmm(within[:, h], values[:, :, h * head_dim : (h + 1) * head_dim])
                        for h in range(heads)
                    ],
                    dim=2,
                ).view(batch_size, num_candidates, num_queries, width)  # [B, K, Q, D]
            # attended [B, Q, D] = sum_k mass_k * summary_k (= attention @ values)
            weights = mass.permute(0, 3, 2, 1).unsqueeze(-1)  # [B, K, Q, H, 1]
            per_head = summary.view(batch_size, num_candidates, num_queries, heads, head_dim)
            attended = (weights * per_head).sum(dim=1).reshape(batch_size, num_queries, width)
            queries = queries + block.out_proj(attended)
            queries = queries + block.mlp(block.ln_mlp(queries))
        assert attention is not None and summary is not None
        token_attention = attention.mean(dim=(1, 2))  # [B, K, T']
        if self.head_type == "listwise":
            if num_candidates > self.max_candidates:
                raise ValueError(f"listwise head scores at most {self.max_candidates} candidates")
            delta = self.head(queries.reshape(batch_size, -1))[:, :num_candidates]  # [B, K]
        else:
            mass = attention.sum(dim=-1)  # [B, H, Q, K]
            products = queries.unsqueeze(1) * summary  # [B, K, Q, D]
            if cand_mask is None:
                real = float(num_candidates)
                mass_feature = mass.mean(dim=1) * real  # [B, Q, K]
            else:
                real = cand_mask.sum(dim=1).to(mass.dtype).view(batch_size, 1, 1)
                mass_feature = mass.mean(dim=1) * real  # [B, Q, K]
            features = torch.cat(
                [products, mass_feature.transpose(1, 2).unsqueeze(-1)], dim=-1
            )  # [B, K, Q, D+1]
            features = features.reshape(batch_size * num_candidates, -1)
            norm, hidden, gelu, out = self.head
            hidden_features = torch.addmm(
                hidden.bias, norm(features), self._transposed_weight(hidden)
            )  # [B*K, hidden] (= hidden(...), BLAS is faster on the pre-transposed weight)
            delta = out(gelu(hidden_features)).view(batch_size, num_candidates)  # [B, K]
        if cand_mask is not None:
            delta = delta.masked_fill(~cand_mask, 0.0)
        return delta, token_attention

    def _transposed_weight(self, linear: nn.Linear) -> torch.Tensor:
        """``linear.weight.T`` contiguous [in, out], cached until the weight changes."""
        weight = linear.weight
        key = (weight.data_ptr(), weight._version, weight.device, weight.dtype)
        cached = self._transposed.get(id(linear))
        if cached is None or cached[0] != key:
            cached = (key, weight.detach().t().contiguous())
            self._transposed[id(linear)] = cached
        return cached[1]
