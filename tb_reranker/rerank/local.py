"""The in-process reranker: query indicators + candidate ids → focused-view scores, reordered.

``Reranker`` joins the model, the frame-token store and the K/V cache (``rerank.cache``):

1. ``encode``: texts → indicators ``[Q, m, D]`` (I_1 drives Milvus, I_2..I_m the fusion);
2. ``rerank``: per query, candidates sorted by broad score, their frame tokens fetched from the
   cache or the store, one batched K/V-free fusion over all queries (the keys and values are
   never formed: ``focused_scores(cand_tokens=...)``), ``S = S' + Δ``; candidates past the
   model's K keep their broad order below (the steps are the functions of ``rerank.batch``).
   With ``cache_kv=True`` the cache holds each video's projected K/V instead (a miss is
   projected, a hit fused from its K/V): cheaper per hit for the symmetric head, dearer per
   miss; see docs/benchmarks.md §6 for the measured trade-off.

``encode`` and ``rerank`` validate their arguments (the SDK boundary) into a ``RerankRequest``;
``rerank_request`` takes one already validated (by the server, the search pipeline) and checks
nothing again. Two-stage search over a Milvus index is ``rerank.pipeline.TwoStageSearch``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from tb_reranker.errors import InvalidInputError, ModelMismatchError
from tb_reranker.requests import Limits, RerankRequest, check_texts
from tb_reranker.rerank.batch import (
    FusionBatch,
    Plan,
    assemble,
    fuse,
    gather_batch,
    missing_ids,
    plan_queries,
    unique_ids,
)
from tb_reranker.rerank.cache import KVCache, Rows
from tb_reranker.rerank.model_info import ModelInfo, encode_texts
from tb_reranker.rerank.videos import Expansion, collapse, combine, expand, segment_counts, spans_of
from tb_reranker.types import RerankResult

if TYPE_CHECKING:  # pragma: no cover
    from tb_reranker.model import TokenBinder
    from tb_reranker.stores import FrameStore

__all__ = ["Reranker"]


def _stack(records: dict[str, Any], ids: list[str], field: str, dtype: Any) -> np.ndarray:
    return np.stack([np.asarray(getattr(records[i], field), dtype=dtype) for i in ids])


def _frames_mask(records: dict[str, Any], ids: list[str], num_frames: int) -> np.ndarray:
    """``[N, T]`` real-frame masks (False = a padded, repeated frame). A record without a mask
    (an old one) has all frames real; so has one whose mask marks none real, as
    ``FrameRecord.video_cls`` reads it."""
    masks = np.ones((len(ids), num_frames), dtype=bool)
    for row, video_id in enumerate(ids):
        mask = getattr(records[video_id], "mask", None)
        if mask is not None and np.any(mask):
            masks[row] = np.asarray(mask, dtype=bool)
    return masks


class Reranker:
    """TokenBinder's focused view over a frame-token store, in process.

    Args:
        model: a loaded ``TokenBinder`` (eval mode is enforced); one prepared for inference
            (``load_checkpoint(inference=True)``) for speed: a plain model hashes its weights
            at each store read (its vision fingerprint, checked against the records).
        store: the ``FrameStore`` holding each video's frame tokens.
        cache_size: videos whose frame tokens (or K/V) are kept (LRU); 0 disables the cache.
        cache_ttl_s: how long a cached entry is trusted when the caller gives no content hash.
        max_candidates: candidates per query accepted by ``rerank`` (beyond the model's K,
            candidates keep their broad order).
        cache_kv: cache each video's projected K/V (every miss pays the projection) instead of
            its frame tokens (every candidate fused K/V-free, the default). Both give the same
            scores up to float rounding.
    """

    def __init__(
        self,
        model: TokenBinder,
        store: FrameStore,
        *,
        cache_size: int = 4096,
        cache_ttl_s: float = 300.0,
        max_candidates: int = 1000,
        cache_kv: bool = False,
    ) -> None:
        self.model = model.eval()
        self.store = store
        self.cache = KVCache(cache_size, cache_ttl_s)
        self.cache_kv = bool(cache_kv)
        self.limits = Limits.sdk(max_candidates=max_candidates)
        self.device = model.device  # a prepared model has buffers, no parameters
        self.embed_dim = int(model.embed_dim)
        self.num_indicators = int(model.num_indicators)
        self.top_k = int(model.top_k)
        self.tokens_per_frame = int(getattr(model, "tokens_per_frame", 1))

    @property
    def max_candidates(self) -> int:
        return self.limits.max_candidates

    def info(self) -> ModelInfo:
        return ModelInfo.of(self.model)

    # ------------------------------------------------------------------ the SDK verbs
    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Texts → indicators ``[Q, m, D]`` float32 (L2-normalised; I_1 = ``[:, 0]``)."""
        return encode_texts(self.model, check_texts(texts, self.limits))

    def rerank(
        self,
        indicators: Any,
        candidates_ids: Sequence[Sequence[str]],
        broad_scores: Sequence[Sequence[float]] | None = None,
        *,
        top_n: int | None = None,
        strict: bool = False,
        contents_hashes: Sequence[Sequence[str | None]] | None = None,
        candidates_are: str = "video",
    ) -> list[RerankResult]:
        """Rerank each query's candidates jointly (the one-to-many focused view).

        Args:
            indicators: ``[Q, m, D]`` (or ``[m, D]`` for one query).
            candidates_ids: Q lists of video ids (no duplicates within a list); with
                ``candidates_are="segment"`` record keys (``<video id>~<n>``: segment n).
            broad_scores: Q lists of S' aligned with the ids; ``None`` → computed from the
                stored tokens (cosine of I_1 with the normalised mean frame token). By video,
                a given score is the video's best segment's (``rerank.videos``).
            top_n: return only the best ``top_n`` per query.
            strict: raise ``NotFoundError`` for ids the store lacks instead of reporting them.
            contents_hashes: optional Q lists of content hashes (validates cached K/V).
            candidates_are: "video": each id stands for every stored segment of its video, and
                is answered with its best segment's scores and span (``start_s``/``end_s``);
                "segment": each id is scored as the record it names.

        Returns:
            Q ``RerankResult``; the first ``min(K, found)`` candidates (segments, by video) by
            broad score are reranked, the rest follow in broad order, ids missing from the
            store come last.
        """
        request = RerankRequest.build(
            indicators,
            candidates_ids,
            broad_scores,
            top_n=top_n,
            strict=strict,
            contents_hashes=contents_hashes,
            candidates_are=candidates_are,
            shape=(self.num_indicators, self.embed_dim),
            limits=self.limits,
        )
        return self.rerank_request(request)

    def rerank_request(self, request: RerankRequest) -> list[RerankResult]:
        """``rerank`` of an already validated request (nothing is checked again)."""
        t_start = time.perf_counter_ns()
        queries = torch.from_numpy(request.indicators).to(self.device)  # [Q, m, D]
        t_fetch = time.perf_counter_ns()
        if request.candidates_are == "segment":

            def plan(rows: Rows) -> tuple[list[Plan], FusionBatch | None]:
                plans = plan_queries(queries, request, rows)
                return plans, gather_batch(plans, rows, self.top_k)

            rows, (plans, batch) = self.cache.collect(unique_ids(request), self._fetch, plan)
            missing = missing_ids(request, rows.index)
            expansion, spans = None, {}
        else:
            expansion, plans, batch, spans = self._plan_videos(queries, request)
            missing = [  # segments of stored videos that the store lacks (collapse says so)
                [key for key in keys if key not in spans]
                for keys in expansion.request.candidates_ids
            ]
        t_fused = time.perf_counter_ns()
        focused = fuse(self.model, queries, batch, len(plans))
        t_done = time.perf_counter_ns()
        timings = {
            "fetch_ns": t_fused - t_fetch,
            "fusion_ns": t_done - t_fused,
            "total_ns": t_done - t_start,
            "batch_size": len(plans),
        }
        if expansion is None:
            return assemble(plans, focused, missing, request.top_n, timings)
        results = assemble(plans, focused, missing, None, timings)
        return collapse(results, expansion, request, spans)

    def _plan_videos(
        self, queries: torch.Tensor, request: RerankRequest
    ) -> tuple[Expansion, list[Plan], FusionBatch | None, dict[str, tuple[float, float]]]:
        """By video (``rerank.videos``): the segment-0 records give the segment counts; when
        every segment is among them (one-segment videos) the plans are made from those rows,
        else from a second read of all the segments (the segment-0 ones cached by the first)."""

        def plan(
            expansion: Expansion, rows: Rows
        ) -> tuple[list[Plan], FusionBatch | None, dict[str, tuple[float, float]]]:
            plans = combine(plan_queries(queries, expansion.request, rows), expansion)
            return plans, gather_batch(plans, rows, self.top_k), spans_of(rows, expansion.keys)

        def first(rows: Rows) -> tuple[Expansion, Any]:
            expansion = expand(request, segment_counts(rows, list(wanted)))
            if expansion.keys <= rows.index.keys():
                return expansion, plan(expansion, rows)
            return expansion, None

        wanted = unique_ids(request)  # video ids = their segment-0 keys
        _, (expansion, planned) = self.cache.collect(wanted, self._fetch, first)
        if planned is None:
            segments = unique_ids(expansion.request)
            _, planned = self.cache.collect(segments, self._fetch, lambda r: plan(expansion, r))
        return (expansion, *planned)

    def invalidate(self, videos_ids: Sequence[str] | None = None) -> None:
        """Forget cached projections of these videos (all when ``None``)."""
        self.cache.invalidate(videos_ids)

    # ------------------------------------------------------------------ store → rows
    def _fetch(self, videos_ids: list[str]) -> tuple[Rows, dict[str, str]]:
        """One store batch for ``videos_ids`` -> rows (their tokens, or with ``cache_kv`` their
        K/V projected in one model call), content hashes."""
        records = self.store.get_many(list(videos_ids))
        self._check_identity(records)
        fetched = [video_id for video_id in videos_ids if video_id in records]
        if not fetched:
            return Rows.empty(), {}
        tokens = np.stack([np.asarray(records[i].tokens) for i in fetched])  # [N, T', D]
        if tokens.ndim != 3 or tokens.shape[-1] != self.embed_dim:
            raise InvalidInputError(
                f"stored frame tokens have dim {tokens.shape[-1]}, "
                f"the model expects {self.embed_dim}: was the store made by another model?"
            )
        max_tokens = int(self.model.num_frames) * self.tokens_per_frame
        if tokens.shape[1] > max_tokens or tokens.shape[1] % self.tokens_per_frame:
            raise InvalidInputError(
                f"stored frame tokens hold {tokens.shape[1]} tokens per video, the model takes "
                f"at most {self.model.num_frames} frames of {self.tokens_per_frame}: was the "
                "store made by another model?"
            )
        frames_tokens = torch.from_numpy(tokens.astype(np.float32, copy=False)).to(self.device)
        masks = _frames_mask(records, fetched, frames_tokens.shape[1] // self.tokens_per_frame)
        with torch.inference_mode():
            frames_mask = None if masks.all() else torch.from_numpy(masks).to(self.device)
            if self.cache_kv:
                # padded frames are not projected (zero K/V); the fusion masks them out
                kv = self.model.project_candidates(frames_tokens, frames_mask)  # [N, n, 2, T', D]
                kv = kv.permute(1, 2, 0, 3, 4).contiguous()  # [n_blocks, 2, N, T', D]
            else:  # K/V-free: the rows hold the tokens themselves
                kv = frames_tokens.contiguous()[None, None]  # [1, 1, N, T', D]
            cls = self.model.pool_cls(frames_tokens, frames_mask)  # [N, D], the model's pooling
        rows = Rows(
            index={video_id: n for n, video_id in enumerate(fetched)},
            kv=kv,
            cls=cls,
            timestamps=_stack(records, fetched, "timestamps", np.float32),  # [N, T]
            masks=masks,  # [N, T]
            spans=np.array(
                [(r.start_s, r.end, r.segments) for r in (records[i] for i in fetched)],
                dtype=np.float64,
            ).reshape(-1, 3),  # [N, 3]
        )
        return rows, {video_id: records[video_id].content_hash for video_id in fetched}

    def _check_identity(self, records: dict[str, Any]) -> None:
        """Refuse frame tokens written by another vision model (each record names its model).

        Tokens of another vision tower are vectors of another space: scoring them would give
        plausible-looking, meaningless numbers. A record names the vision fingerprint of the
        model that made it (or, written before the identity was split, that model's whole
        fingerprint: accepted when it is the loaded model's). Records without a fingerprint
        (written by hand or by an old version) are accepted, as a collection without one is.
        """
        vision = str(self.model.vision_fingerprint())  # a prepared model's: computed once
        marks = {getattr(record, "fingerprint", "") for record in records.values()} - {"", vision}
        if not marks:
            return
        whole = str(self.model.fingerprint())  # legacy records carry the whole model's
        foreign = sorted(
            video_id
            for video_id, record in records.items()
            if getattr(record, "fingerprint", "") not in ("", vision, whole)
        )
        if foreign:
            other = records[foreign[0]].fingerprint
            raise ModelMismatchError(
                f"{len(foreign)} stored videos (e.g. {foreign[0]!r}) hold frame tokens of model "
                f"{other}, but the loaded checkpoint's vision side is {vision}: serve "
                "a checkpoint with their vision side, run `tb migrate --checkpoint "
                "THE_CHECKPOINT_THAT_INGESTED_THEM` if the store predates vision fingerprints, "
                "or re-index them with this checkpoint (`tb ingest VIDEOS --checkpoint CHECKPOINT "
                "--collection NEW_NAME --store NEW_DIR`)"
            )
