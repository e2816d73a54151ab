"""One rerank call's steps after the rows are known: plan, gather, fuse, assemble.

1. :func:`plan_queries`: per query the candidates present in the rows, sorted by broad score
   (given, or the cosine of I_1 with the stored pooled tokens);
2. :func:`gather_batch`: the first ``K`` of every plan as one padded :class:`FusionBatch`
   (one row gather out of the rows / cache slab);
3. :func:`fuse`: one ``focused_scores`` call over all queries -> per query Δ and best frame
   (from the candidates' tokens, K/V-free, or from their projected K/V, as the rows hold);
4. :func:`assemble`: ``S = S' + Δ`` for the reranked head, the rest in broad order below,
   missing ids reported.

The inputs are trusted (a validated ``RerankRequest`` and rows this model projected), so the
model is called without re-validation.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from tb_reranker.errors import NotFoundError
from tb_reranker.rerank.cache import Rows, take
from tb_reranker.types import RerankedCandidate, RerankResult

if TYPE_CHECKING:  # pragma: no cover
    from tb_reranker.model import TokenBinder
    from tb_reranker.requests import RerankRequest

__all__ = [
    "Plan",
    "FusionBatch",
    "Focused",
    "plan_queries",
    "gather_batch",
    "fuse",
    "assemble",
    "unique_ids",
    "missing_ids",
]

Plan = list[tuple[int, str, float]]  # (index in the request, video id, broad score), best first
Focused = tuple[list[float], list[float] | None]  # per reranked candidate: Δ, best frame (s)


@dataclass
class FusionBatch:
    """The fusion inputs of the queries that have candidates (``active``), padded to ``K``."""

    active: list[int]  # query positions with at least one present candidate
    sizes: list[int]  # per query (all of them): candidates reranked, min(present, K)
    cand_kv: torch.Tensor  # [B, K, n_blocks, 2, T', D] or tokens [B, K, 1, 1, T', D], a view
    cand_cls: torch.Tensor  # [B, K, D]
    cand_mask: torch.Tensor | None  # [B, K]; None when no query needs padding
    timestamps: np.ndarray  # [B, K, T] seconds
    frames_mask: torch.Tensor | None = None  # [B, K, T]: False = padded frame; None = all real
    kv_free: bool = False  # cand_kv holds the frame tokens: fuse K/V-free

    @property
    def cand_tokens(self) -> torch.Tensor:
        """The candidates' frame tokens ``[B, K, T', D]`` (a view) of a ``kv_free`` batch."""
        return self.cand_kv[:, :, 0, 0]


def unique_ids(request: RerankRequest) -> dict[str, str | None]:
    """Every candidate id of the request once, with the first content hash given for it."""
    wanted: dict[str, str | None] = {}
    for ids, hashes in zip(request.candidates_ids, request.contents_hashes, strict=True):
        for n, video_id in enumerate(ids):
            if video_id not in wanted:
                wanted[video_id] = hashes[n] if hashes is not None else None
    return wanted


def missing_ids(request: RerankRequest, present: dict[str, int]) -> list[list[str]]:
    """Per query the ids the rows lack; ``NotFoundError`` for any when the request is strict."""
    missing = [[i for i in ids if i not in present] for ids in request.candidates_ids]
    if request.strict and any(missing):
        absent = sorted({i for ms in missing for i in ms})
        raise NotFoundError(f"{len(absent)} candidate ids not in the frame store: {absent[:10]}")
    return missing


def _stored_scores(queries: torch.Tensor, request: RerankRequest, rows: Rows) -> Iterator[float]:
    """cos(I_1, pooled tokens) of the present candidates of queries given without scores."""
    index = rows.index
    flat = [
        (q, index[i])
        for q, ids in enumerate(request.candidates_ids)
        if request.broad_scores[q] is None
        for i in ids
        if i in index
    ]
    if not flat:
        return iter(())
    which = torch.tensor([f[0] for f in flat], device=queries.device)
    slots = torch.tensor([f[1] for f in flat], device=rows.cls.device)
    return iter((rows.cls.index_select(0, slots) * queries[which, 0]).sum(-1).tolist())


def plan_queries(queries: torch.Tensor, request: RerankRequest, rows: Rows) -> list[Plan]:
    """Per query the present candidates sorted by broad score, best first."""
    index = rows.index
    computed = _stored_scores(queries, request, rows)
    plans: list[Plan] = []
    for ids, given in zip(request.candidates_ids, request.broad_scores, strict=True):
        present = [
            (n, video_id, given[n] if given is not None else next(computed))
            for n, video_id in enumerate(ids)
            if video_id in index
        ]
        present.sort(key=lambda item: -item[2])
        plans.append(present)
    return plans


def gather_batch(plans: Sequence[Plan], rows: Rows, top_k: int) -> FusionBatch | None:
    """The fusion inputs of every plan's first ``top_k``; ``None`` when no query has one."""
    sizes = [min(len(p), top_k) for p in plans]
    active = [q for q, size in enumerate(sizes) if size > 0]
    if not active:
        return None
    k_max = max(sizes)
    gather: list[int] = []
    masks: list[list[bool]] = []
    for q in active:
        chosen = [rows.index[video_id] for _, video_id, _ in plans[q][: sizes[q]]]
        pad = k_max - len(chosen)
        gather.extend(chosen + [chosen[0]] * pad)  # padding rows are masked out
        masks.append([True] * len(chosen) + [False] * pad)
    slots = torch.tensor(gather, dtype=torch.long, device=rows.kv.device)
    kv = take(rows.kv, slots)  # [n_blocks, 2, B*K, T', D]
    num_active = len(active)
    frames_mask = rows.masks[gather]  # [B*K, T]
    return FusionBatch(
        active=active,
        sizes=sizes,
        cand_kv=kv.view(*kv.shape[:2], num_active, k_max, *kv.shape[3:]).permute(2, 3, 0, 1, 4, 5),
        cand_cls=rows.cls.index_select(0, slots).view(num_active, k_max, -1),
        cand_mask=(
            None
            if all(sizes[q] == k_max for q in active)
            else torch.tensor(masks, device=rows.cls.device)
        ),
        timestamps=rows.timestamps[gather].reshape(num_active, k_max, -1),
        kv_free=rows.kv_free,
        frames_mask=(
            None
            if frames_mask.all()
            else torch.from_numpy(frames_mask.reshape(num_active, k_max, -1)).to(rows.cls.device)
        ),
    )


def fuse(
    model: TokenBinder, queries: torch.Tensor, batch: FusionBatch | None, num_queries: int
) -> list[Focused | None]:
    """One batched fusion call over all queries' top-K; per query (Δ [k], best frame s [k])."""
    out: list[Focused | None] = [None] * num_queries
    if batch is None:
        return out
    active = batch.active
    with torch.inference_mode():
        # inputs built here from a validated request and this model's own tokens / K/V
        scores = model.focused_scores(
            queries[active] if len(active) < queries.shape[0] else queries,
            batch.cand_cls,
            batch.cand_tokens if batch.kv_free else None,
            batch.cand_mask,
            cand_kv=None if batch.kv_free else batch.cand_kv,
            frames_mask=batch.frames_mask,
            validate=False,
        )
    deltas = scores.delta.float().cpu().numpy().tolist()  # [B, K]
    attention = getattr(scores, "frame_attention", None)
    best = None
    if attention is not None:
        frames = attention.float().cpu().numpy().argmax(-1)  # [B, K]
        best = np.take_along_axis(batch.timestamps, frames[..., None], axis=-1)[..., 0].tolist()
    for b, q in enumerate(active):
        size = batch.sizes[q]
        out[q] = (deltas[b][:size], best[b][:size] if best is not None else None)
    return out


def _ordered(plan: Plan, focused: Focused | None) -> list[RerankedCandidate]:
    """The reranked head by S = S' + Δ, then the rest of the plan in broad order."""
    deltas, best = focused if focused is not None else ((), None)
    head = [
        RerankedCandidate(
            video_id, index, score + delta, score, delta, best[k] if best is not None else None
        )
        for k, ((index, video_id, score), delta) in enumerate(zip(plan, deltas, strict=False))
    ]
    head.sort(key=lambda c: -c.score)
    tail = [
        RerankedCandidate(video_id, index, score, score, 0.0, None, reranked=False)
        for index, video_id, score in plan[len(deltas) :]
    ]
    return head + tail


def assemble(
    plans: Sequence[Plan],
    focused: Sequence[Focused | None],
    missing: Sequence[list[str]],
    top_n: int | None,
    timings: dict[str, int],
) -> list[RerankResult]:
    """One ``RerankResult`` per query (``top_n`` best candidates, missing ids last)."""
    results = []
    for plan, found, absent in zip(plans, focused, missing, strict=True):
        ordered = _ordered(plan, found)
        if top_n is not None:
            ordered = ordered[:top_n]
        results.append(RerankResult(candidates=ordered, missing_ids=absent, timings=dict(timings)))
    return results
