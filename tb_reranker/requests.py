"""Request objects and the one set of input limits, checked once at each boundary.

The boundaries are the SDK (``Client``, ``Reranker``, ``RemoteReranker``), the gRPC servicers and
the HTTP provider endpoints (both through ``server.engine.ServingEngine``). Each builds a request
with ``SearchRequest.build`` / ``RerankRequest.build`` / ``RerankQuery.build`` (or ``check_texts``),
which raise ``InvalidInputError`` naming the limit; the layers below (``TwoStageSearch.run``,
``Reranker.rerank_request``, the micro-batcher) take the built objects and check nothing again.

``Limits`` is the one set of numbers: the server builds it from ``ServerConfig`` (``tb serve
--max-candidates`` ...), the SDK uses the defaults. Filters are checked by
:func:`tb_reranker.filters.check_filter` with the limits' filter bounds. Only numpy is imported.
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from tb_reranker.errors import InvalidInputError
from tb_reranker.filters import MAX_FILTER_CHARS, MAX_FILTER_DEPTH, check_filter

__all__ = [
    "Limits",
    "DEFAULT_LIMITS",
    "MAX_INDICATOR_ABS",
    "MAX_BROAD_SCORE_ABS",
    "MAX_TEXTS",
    "GROUPS",
    "CANDIDATE_KINDS",
    "DEFAULT_MOMENTS_PER_VIDEO",
    "MAX_MOMENTS_PER_VIDEO",
    "RerankQuery",
    "RerankRequest",
    "SearchRequest",
    "check_text",
    "check_texts",
    "check_indicators",
    "check_limit",
    "check_candidates_are",
    "check_moments_per_video",
    "check_top_n",
]

# largest |value| accepted in caller-given indicators: encode_text's rows have norm 1, and values
# this small keep every score finite (3e38 is finite in float32 but overflows S' and the fusion)
MAX_INDICATOR_ABS = 1e4
# largest |broad score| a caller may send: far beyond any similarity, small enough that
# S = S' + delta stays finite and exact enough to order
MAX_BROAD_SCORE_ABS = 1e12

MAX_TEXTS = 256  # default limit of texts per encode call on the server

GROUPS = ("video", "moment")  # what a search hit is: a video (limit counts videos) or a moment
# what a rerank candidate id names: a video (every stored segment of it, answered with its best
# one; what an external caller means) or one segment (a record key: the search pipeline's)
CANDIDATE_KINDS = ("video", "segment")
DEFAULT_MOMENTS_PER_VIDEO = 3  # scored moments a video hit carries
MAX_MOMENTS_PER_VIDEO = 16  # 16 x the largest limit (1000) fits one Milvus grouping search

# the frame store's record-key rule (tb_reranker.stores.record.validate_record_key: a video id,
# optionally "~n" for segment n >= 1), without importing the store here; a refused id is
# re-checked there only to word the error
_VALID_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,254}(~[1-9][0-9]{0,4})?$")


@dataclass(frozen=True)
class Limits:
    """The input limits; every refusal names the field it hit (``max_candidates=1000``)."""

    max_text_chars: int = 2048  # characters per query text (CLIP truncates at 77 tokens anyway)
    max_texts: int | None = MAX_TEXTS  # texts per encode call (None: no limit, the SDK's)
    max_candidates: int = 1000  # candidate ids per query, and the largest search limit
    max_filter_chars: int = MAX_FILTER_CHARS  # characters of a filter expression
    max_filter_depth: int = MAX_FILTER_DEPTH  # nested brackets in a filter expression

    @classmethod
    def sdk(cls, **overrides: Any) -> Limits:
        """The in-process SDK's limits: the defaults without a cap on the number of texts."""
        return replace(DEFAULT_LIMITS, max_texts=None, **overrides)

    @classmethod
    def syntax_only(cls) -> Limits:
        """Types and shapes only: the remote SDK leaves the numbers to the server it calls."""
        big = sys.maxsize
        return cls(big, None, big, big, big)


DEFAULT_LIMITS = Limits()


# ---------------------------------------------------------------------- single values
def check_text(text: Any, limits: Limits = DEFAULT_LIMITS) -> str:
    if not isinstance(text, str) or not text.strip():
        raise InvalidInputError("query text is empty (give a non-empty string)")
    if len(text) > limits.max_text_chars:
        raise InvalidInputError(
            f"query text has {len(text)} characters; the limit is {limits.max_text_chars} "
            f"(max_text_chars={limits.max_text_chars})"
        )
    return text


def check_texts(texts: Any, limits: Limits = DEFAULT_LIMITS) -> list[str]:
    """A non-empty list of query texts, each checked by :func:`check_text`."""
    if isinstance(texts, str):
        raise InvalidInputError("texts must be a list of strings, not one string")
    texts = list(texts)
    if not texts:
        raise InvalidInputError("no query texts given")
    if limits.max_texts is not None and len(texts) > limits.max_texts:
        raise InvalidInputError(f"{len(texts)} texts exceed max_texts={limits.max_texts}")
    for text in texts:
        check_text(text, limits)
    return texts


def check_indicators(indicators: Any, shape: tuple[int, int] | None) -> np.ndarray:
    """``[Q, m, D]`` (or ``[m, D]`` for one query) finite float32 → ``[Q, m, D]``.

    ``shape`` is the model's ``(m, D)``; ``None`` checks the rank only (the remote SDK, whose
    server knows the model).
    """
    try:
        array = np.asarray(indicators, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"indicators must be an array of numbers: {exc}") from None
    if array.ndim == 2:
        array = array[None]
    expected = "[Q, m, D]" if shape is None else f"[Q, {shape[0]}, {shape[1]}] (m, D of the model)"
    if array.ndim != 3 or (shape is not None and array.shape[1:] != tuple(shape)):
        raise InvalidInputError(
            f"indicators must have shape {expected}, got {list(np.shape(indicators))}"
        )
    if array.shape[0] == 0:
        raise InvalidInputError("no queries given (the indicators hold no query)")
    if not np.isfinite(array).all():
        raise InvalidInputError("indicators contain NaN or infinity")
    if array.size and float(np.abs(array).max()) > MAX_INDICATOR_ABS:
        raise InvalidInputError(
            f"indicator values must lie in [-{MAX_INDICATOR_ABS:g}, {MAX_INDICATOR_ABS:g}] "
            "(encode gives L2-normalised rows); larger ones overflow the scores"
        )
    return array


def check_limit(limit: Any, limits: Limits = DEFAULT_LIMITS) -> int:
    if isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0:
        raise InvalidInputError(f"limit must be a positive integer, got {limit!r}")
    if limit > limits.max_candidates:
        raise InvalidInputError(
            f"limit must be in 1..{limits.max_candidates} (max_candidates), got {limit}"
        )
    return limit


def check_moments_per_video(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInputError(f"moments_per_video must be an integer, got {value!r}")
    if not 1 <= value <= MAX_MOMENTS_PER_VIDEO:
        raise InvalidInputError(
            f"moments_per_video must be in 1..{MAX_MOMENTS_PER_VIDEO}, got {value}"
        )
    return value


def check_group(group: Any) -> str:
    if group not in GROUPS:
        raise InvalidInputError(f"group must be one of {', '.join(GROUPS)}; got {group!r}")
    return group


def check_candidates_are(value: Any) -> str:
    if value not in CANDIDATE_KINDS:
        raise InvalidInputError(
            f"candidates_are must be one of {', '.join(CANDIDATE_KINDS)}; got {value!r}"
        )
    return value


def check_top_n(top_n: Any) -> int | None:
    if top_n is None:
        return None
    if isinstance(top_n, bool) or not isinstance(top_n, int | np.integer) or top_n <= 0:
        raise InvalidInputError(f"top_n must be positive, got {top_n!r}")
    return int(top_n)


# ---------------------------------------------------------------------- one query's candidates
def _where(q: int | None) -> str:
    return "" if q is None else f"query {q}: "


def check_candidates(
    ids: Any, limits: Limits, q: int | None = None, candidates_are: str = "segment"
) -> list[str]:
    """Distinct, well-formed record keys, at most ``max_candidates``; with ``candidates_are``
    "video" video ids (a segment key ``<video id>~<n>`` is refused: by video each id stands for
    all of its segments)."""
    if isinstance(ids, str):
        raise InvalidInputError("each query's candidates must be a list of ids, not one string")
    try:
        ids = list(ids)
    except TypeError:
        raise InvalidInputError("each query's candidates must be a list of ids") from None
    if not ids:
        raise InvalidInputError(f"{_where(q)}no candidates given")
    if len(ids) > limits.max_candidates:
        raise InvalidInputError(
            f"{_where(q)}{len(ids)} candidates exceed max_candidates={limits.max_candidates}"
        )
    if any(not isinstance(i, str) or not i for i in ids):
        raise InvalidInputError(f"{_where(q)}candidate ids must be non-empty strings")
    bad = next((i for i in ids if not _VALID_ID.fullmatch(i) or ".." in i), None)
    if bad is not None:  # refused here, before it can fail a whole batch of other calls
        from tb_reranker.stores.record import validate_record_key

        validate_record_key(bad)  # raises with the rule spelled out
        raise InvalidInputError(f"invalid video id {bad!r}")  # pragma: no cover - same rule
    if candidates_are == "video":
        key = next((i for i in ids if "~" in i), None)
        if key is not None:
            raise InvalidInputError(
                f"{_where(q)}candidate {key!r} is a segment key, but the candidates are video "
                "ids (each stands for every stored segment of its video): pass the video id, "
                "or candidates_are='segment' to rerank segments by their keys"
            )
    if len(set(ids)) != len(ids):
        seen: set[str] = set()
        dupes = sorted({i for i in ids if i in seen or seen.add(i)})
        raise InvalidInputError(f"{_where(q)}duplicate candidate ids: {dupes[:10]}")
    return ids


def check_broad_scores(scores: Any, count: int, q: int | None = None) -> list[float] | None:
    if scores is None:
        return None
    try:
        values = [float(s) for s in scores]
    except (TypeError, ValueError):
        raise InvalidInputError(f"{_where(q)}broad scores must be numbers") from None
    if len(values) != count:
        raise InvalidInputError(
            f"{_where(q)}{count} candidate ids but {len(values)} broad scores (give one per "
            "id, or none to compute them from the stored tokens)"
        )
    if not all(math.isfinite(s) for s in values):
        raise InvalidInputError(f"{_where(q)}broad scores contain NaN or infinity")
    if any(abs(s) > MAX_BROAD_SCORE_ABS for s in values):
        raise InvalidInputError(
            f"broad scores must lie in [-{MAX_BROAD_SCORE_ABS:g}, {MAX_BROAD_SCORE_ABS:g}]"
        )
    return values


def check_hashes(hashes: Any, count: int, q: int | None = None) -> list[str | None] | None:
    if hashes is None:
        return None
    values = [h or None for h in hashes]
    if len(values) != count:
        raise InvalidInputError(
            f"{_where(q)}{count} candidate ids but {len(values)} content hashes"
        )
    if any(h is not None and not isinstance(h, str) for h in values):
        raise InvalidInputError(f"{_where(q)}content hashes must be strings")
    return values


def _per_query(values: Any, num_queries: int, what: str) -> list[Any]:
    if values is None:
        return [None] * num_queries
    if isinstance(values, str) or len(values) != num_queries:
        count = "a string" if isinstance(values, str) else len(values)
        raise InvalidInputError(f"{num_queries} queries but {count} {what}")
    return list(values)


# ---------------------------------------------------------------------- requests
@dataclass
class RerankQuery:
    """One query of a Rerank call (the server's unit of batching), validated."""

    candidates_ids: list[str]  # K' distinct ids
    text: str | None = None  # the query as text (encoded in the batch) ...
    indicators: np.ndarray | None = None  # ... or as indicators [m, D] float32
    broad_scores: list[float] | None = None  # [K'] S'; None = computed from the stored tokens
    contents_hashes: list[str | None] | None = None  # [K'] hashes that validate cached K/V
    top_n: int | None = None  # keep the best top_n
    strict: bool = False  # ids missing from the store -> NotFoundError
    candidates_are: str = "video"  # CANDIDATE_KINDS: video ids, or segment keys

    @classmethod
    def build(
        cls,
        *,
        candidates_ids: Any,
        text: Any = None,
        indicators: Any = None,
        broad_scores: Any = None,
        contents_hashes: Any = None,
        top_n: Any = None,
        strict: bool = False,
        candidates_are: Any = "video",
        shape: tuple[int, int] | None,
        limits: Limits = DEFAULT_LIMITS,
    ) -> RerankQuery:
        if (text is None) == (indicators is None):
            raise InvalidInputError("give the query as text or as indicators (exactly one)")
        row = None
        if indicators is not None:
            array = check_indicators(indicators, shape)
            if array.shape[0] != 1:
                raise InvalidInputError(
                    f"one query per call: indicators must be [m, D], got {list(array.shape)}"
                )
            row = array[0]
        kind = check_candidates_are(candidates_are)
        ids = check_candidates(candidates_ids, limits, candidates_are=kind)
        return cls(
            candidates_ids=ids,
            text=None if text is None else check_text(text, limits),
            indicators=row,
            broad_scores=check_broad_scores(broad_scores, len(ids)),
            contents_hashes=check_hashes(contents_hashes, len(ids)),
            top_n=check_top_n(top_n),
            strict=bool(strict),
            candidates_are=kind,
        )


@dataclass
class RerankRequest:
    """Q queries given as indicators, validated: what a ``RerankBackend`` reranks.

    Per query the broad scores and the content hashes are optional (``None``: computed from the
    stored tokens / no cache validation). ``candidates_are`` "video" (the default): each id is a
    video, reranked as its stored segments and answered with its best one (its broad score, if
    given, is its best segment's: ``rerank.videos``); "segment": each id is a record key, scored
    as it is (what the search pipeline sends). For a one-segment video both are the same.
    """

    indicators: np.ndarray  # [Q, m, D] float32
    candidates_ids: list[list[str]]
    broad_scores: list[list[float] | None]
    contents_hashes: list[list[str | None] | None]
    top_n: int | None = None
    strict: bool = False
    candidates_are: str = "video"  # CANDIDATE_KINDS

    @classmethod
    def build(
        cls,
        indicators: Any,
        candidates_ids: Any,
        broad_scores: Any = None,
        *,
        top_n: Any = None,
        strict: bool = False,
        contents_hashes: Any = None,
        candidates_are: Any = "video",
        shape: tuple[int, int] | None,
        limits: Limits = DEFAULT_LIMITS,
    ) -> RerankRequest:
        queries = check_indicators(indicators, shape)
        num_queries = queries.shape[0]
        lists = _per_query(candidates_ids, num_queries, "candidate lists")
        scores = _per_query(broad_scores, num_queries, "score lists")
        hashes = _per_query(contents_hashes, num_queries, "hash lists")
        top_n = check_top_n(top_n)
        kind = check_candidates_are(candidates_are)
        ids = [check_candidates(lists[q], limits, q, kind) for q in range(num_queries)]
        return cls(
            indicators=queries,
            candidates_ids=ids,
            broad_scores=[
                check_broad_scores(scores[q], len(ids[q]), q) for q in range(num_queries)
            ],
            contents_hashes=[check_hashes(hashes[q], len(ids[q]), q) for q in range(num_queries)],
            top_n=top_n,
            strict=bool(strict),
            candidates_are=kind,
        )

    @classmethod
    def of_queries(cls, queries: Sequence[RerankQuery], indicators: np.ndarray) -> RerankRequest:
        """Validated single queries of one ``candidates_are`` (their indicators stacked in
        ``indicators``) as one batch."""
        kinds = {query.candidates_are for query in queries}
        if len(kinds) != 1:
            raise ValueError(f"one batch holds queries of one candidates_are, got {sorted(kinds)}")
        return cls(
            indicators=indicators,
            candidates_ids=[query.candidates_ids for query in queries],
            broad_scores=[query.broad_scores for query in queries],
            contents_hashes=[query.contents_hashes for query in queries],
            candidates_are=kinds.pop(),
        )


@dataclass(frozen=True)
class SearchRequest:
    """A two-stage search, validated: texts *or* indicators ``[Q, m, D]``, one hit list each.

    ``group`` "video": ``limit`` counts videos, each hit carries up to ``moments_per_video``
    scored moments; "moment": ``limit`` counts moments, one hit each."""

    texts: list[str] | None
    indicators: np.ndarray | None
    limit: int = 10
    rerank: bool = True
    filter: str | None = None
    group: str = "video"
    moments_per_video: int = DEFAULT_MOMENTS_PER_VIDEO

    @property
    def num_queries(self) -> int:
        return len(self.texts) if self.texts is not None else len(self.indicators)  # type: ignore[arg-type]

    @classmethod
    def build(
        cls,
        queries: Any,
        *,
        limit: Any = 10,
        rerank: bool = True,
        filter: Any = None,  # noqa: A002 - Milvus's name
        group: Any = "video",
        moments_per_video: Any = DEFAULT_MOMENTS_PER_VIDEO,
        shape: tuple[int, int] | None = None,
        limits: Limits = DEFAULT_LIMITS,
        texts_only: bool = False,
    ) -> SearchRequest:
        """``queries``: a list of texts or indicators ``[Q, m, D]`` (``texts_only``: texts)."""
        limit = check_limit(limit, limits)
        filter = check_filter(
            filter, max_chars=limits.max_filter_chars, max_depth=limits.max_filter_depth
        )
        grouping = (check_group(group), check_moments_per_video(moments_per_video))
        if isinstance(queries, str):
            raise InvalidInputError("queries must be a list (use Client.search for one text)")
        if queries is None or len(queries) == 0:
            what = "text" if texts_only else "text or indicator set"
            raise InvalidInputError(f"no query given (pass at least one {what})")
        if texts_only or isinstance(queries[0], str):
            if any(not isinstance(text, str) for text in queries):
                raise InvalidInputError("every query must be a string")
            texts = check_texts(queries, replace(limits, max_texts=None))
            return cls(texts, None, limit, bool(rerank), filter, *grouping)
        return cls(None, check_indicators(queries, shape), limit, bool(rerank), filter, *grouping)
