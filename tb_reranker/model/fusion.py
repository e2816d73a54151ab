"""Focused-view fusion (docs/method.md §3): indicators I_2..I_m attend jointly over K candidates' tokens.

Layout of the cacheable candidate side. For every fusion block b a video's tokens are turned into
keys and values on their own, independent of the query and of the other candidates::

    x_t   = LN_b(token_t) + e_pos[frame(t)]                 # [T', D]
            (token_t + W_m (token_t - token_{t-1}) with ``frame_motion``: ``motion``)
    k_t   = W_k,b x_t + b_k,b ;  v_t = W_v,b x_t + b_v,b     # [T', D] each

``project_candidates`` returns these stacked as ``[N, n_blocks, 2, T', D]`` (T' = T, or
T·(1+P) with patch tokens). The rank embedding e_k (docs/method.md §3) is added *after* the
projection as ``W_k,b e_k`` / ``W_v,b e_k`` (the same matrices, no bias), which is exactly
``W (x_t + e_k) + b``: the paper's X = tokens + e_k + e_t, with the per-video part cacheable.

The blocks (``fusion_block``) run the attention; this module adds the per-video projection, the
loop over the blocks (:meth:`FocusedFusion.attend`) and the Δ heads (:meth:`FocusedFusion.delta`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tb_reranker.model.fusion_block import (
    BlockOutput,
    CrossAttentionBlock,
    ProjectedKV,
    TokenInputs,
    gumbel_like,
)
from tb_reranker.model.motion import FrameMotion

__all__ = [
    "BlockOutput",
    "CrossAttentionBlock",
    "FocusedFusion",
    "FocusedScores",
    "LISTWISE_HEADS",
    "gumbel_like",
]

# heads with one output per rank slot (at most ``max_candidates`` candidates, rank embeddings)
LISTWISE_HEADS = ("listwise", "listwise_slots")


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
        frame_motion: bool = False,
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
        # the frame tokens' change from the previous frame (module docstring of ``motion``)
        self.motion = FrameMotion(width, tokens_per_frame) if frame_motion else None
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

    def frame_inputs(
        self, frames_tokens: torch.Tensor, frames_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The tokens the blocks read: the frame tokens, plus their motion with ``frame_motion``.

        frames_tokens: [..., T', D]; frames_mask: [..., T] bool or None -> [..., T', D]."""
        return frames_tokens if self.motion is None else self.motion(frames_tokens, frames_mask)

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
        frames_tokens = self.frame_inputs(frames_tokens, frames_mask)
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
        """Δ scores and attention: :meth:`attend`, then :meth:`delta`.

        Arguments as in :meth:`attend`. returns (delta [B, K] (0 at padded candidates),
        token_attention [B, K, T'] (mean over heads and queries of the last block's attention;
        0 at padded candidates and frames))
        """
        fused = self.attend(
            queries, cand_kv, cand_mask, cand_tokens=cand_tokens, frames_mask=frames_mask
        )
        delta = self.delta(fused.queries, fused.mass, fused.summary, cand_mask)
        return delta, fused.attention.mean(dim=(1, 2))  # [B, K], [B, K, T']

    def attend(
        self,
        queries: torch.Tensor,
        cand_kv: torch.Tensor | None = None,
        cand_mask: torch.Tensor | None = None,
        *,
        cand_tokens: torch.Tensor | None = None,
        frames_mask: torch.Tensor | None = None,
    ) -> BlockOutput:
        """The fused indicators: every block in turn, from cached K/V or from the tokens.

        queries: [B, Q, D] (indicators I_2..I_m); exactly one of cand_kv: [B, K, n_blocks, 2,
        T', D] (``project_candidates`` output, read in place: a free view when it is a permuted
        ``[n_blocks, 2, B*K, T', D]`` gather, as the ``Reranker`` passes it) and cand_tokens:
        [B, K, T', D] (the stored frame tokens: the K/V are never formed, see
        :class:`~tb_reranker.model.fusion_block.TokenInputs`; the cheap path for uncached
        candidates); cand_mask: [B, K] bool or None; frames_mask: [B, K, T] bool (False = a
        padded frame of a short video: its tokens get no attention, as if absent) or None. Both
        sources give the same result up to float rounding. Returns the last block's output (its
        ``summary`` is None for the ``listwise`` head, which does not read it).
        """
        if (cand_kv is None) == (cand_tokens is None):
            raise ValueError("give exactly one of cand_kv and cand_tokens")
        source = cand_kv if cand_kv is not None else cand_tokens
        assert source is not None
        num_candidates = source.shape[1]
        if self.head_type in LISTWISE_HEADS and num_candidates > self.max_candidates:
            raise ValueError(f"listwise head scores at most {self.max_candidates} candidates")
        rank_embeddings = (
            None if self.rank_embedding is None else self.rank_embedding[:num_candidates]
        )
        if cand_tokens is not None:
            cand_tokens = self.frame_inputs(cand_tokens, frames_mask)
        positions = None if cand_tokens is None else self.position_embeddings(cand_tokens.shape[2])
        tokens_mask = self.tokens_mask(frames_mask)
        gumbel_scale = self.gumbel_scale if self.training else 0.0
        fused = None
        for index, block in enumerate(self.blocks):
            if cand_tokens is not None:
                candidates: ProjectedKV | TokenInputs = TokenInputs(
                    block.kv_inputs(cand_tokens, positions), rank_embeddings
                )
            else:
                candidates = _block_kv(block, cand_kv[:, :, index], rank_embeddings)
            fused = block(
                queries,
                candidates,
                cand_mask,
                tau=self.gumbel_tau,
                gumbel_scale=gumbel_scale,
                tokens_mask=tokens_mask,
                need_summary=index == self.num_blocks - 1 and self.head_type != "listwise",
            )
            queries = fused.queries
        assert fused is not None
        return fused

    def delta(
        self,
        queries: torch.Tensor,
        mass: torch.Tensor,
        summary: torch.Tensor | None,
        cand_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The Δ head on the last block's output: fused queries [B, Q, D], mass [B, H, Q, K],
        summary [B, K, Q, D] (None for ``listwise``) -> Δ [B, K] (0 at padded candidates)."""
        num_candidates = mass.shape[-1]
        if self.head_type == "listwise":
            delta = self.head(queries.flatten(1))[:, :num_candidates]
        elif summary is None:
            raise ValueError(f"the {self.head_type} head reads the candidates' summaries")
        elif self.head_type == "listwise_slots":
            delta = self._slots_delta(queries, mass, summary, cand_mask)
        else:
            delta = self._symmetric_delta(queries, mass, summary, cand_mask)
        if cand_mask is not None:
            delta = delta.masked_fill(~cand_mask, 0.0)
        return delta

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


def _block_kv(
    block: CrossAttentionBlock, kv: torch.Tensor, rank_embeddings: torch.Tensor | None
) -> ProjectedKV:
    """One block's cached keys and values, kv [B, K, 2, T', D], with the rank embeddings'
    bias-free projections added (``W (x + e_k) + b``)."""
    keys, values = kv[:, :, 0], kv[:, :, 1]  # [B, K, T', D] each
    if rank_embeddings is not None:
        rank = block.rank_kv(rank_embeddings)  # [2, K, D]
        keys = keys + rank[0][None, :, None, :]
        values = values + rank[1][None, :, None, :]
    return ProjectedKV(keys, values)
