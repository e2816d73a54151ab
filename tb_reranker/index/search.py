"""The broad search over a collection's [CLS] vectors, and reading rows page by page.

:class:`BroadSearch` picks one of three strategies per request:

- no filter: one HNSW search (``ef`` at least ``limit``);
- a filter matching at most ``exact_threshold`` rows: those rows scored exactly (their vectors
  read page by page, a running top-``limit`` per query);
- a wider filter: HNSW with ``ef`` raised by the selectivity, and any query that still comes back
  short scored exactly.

Grouped by video (``group_size`` set: ``limit`` counts videos, each with its best ``group_size``
segments; :mod:`tb_reranker.index.grouping`): Milvus grouping search (``group_by_field``
``video_id``) where the engine has it (Milvus Lite, servers >= 2.4) on a collection with
``video_id`` as a real field (schema 2), without a filter; otherwise the segments are fetched by
the strategies above and grouped here, fetching more until ``limit`` videos are found or the
matches run out. Either way a video found with fewer segments than it may have is completed:
its rows read by key (``v``, ``v~1``, ...; no filter) or, where that cannot settle it (a filter,
a number missing), by one filtered search on its ``video_id``. Both give the same hits. Milvus
Lite's grouping search groups only its top ``max(3·size, 10)·limit`` segments, so on Lite
``auto`` groups here (measured cheaper: benchmarks/moment_search.py).

Rows are read in pages of id ranges (:func:`iter_pages`) with a ``query`` per range, not
pymilvus's query iterator; :func:`count_rows` is one ``count(*)`` query.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from tb_reranker.errors import InvalidInputError
from tb_reranker.index import schema as milvus_schema
from tb_reranker.index.connection import MilvusConnection, consistency
from tb_reranker.index.entities import BATCH, OUTPUT_FIELDS, flatten
from tb_reranker.index.grouping import (
    first_read,
    group_by_video,
    is_complete,
    segment_fields,
    video_filter,
)
from tb_reranker.stores.record import MAX_SEGMENTS, segment_key

__all__ = [
    "EXACT_THRESHOLD",
    "GROUPINGS",
    "MAX_LIMIT",
    "BroadSearch",
    "SearchRequest",
    "check_limit",
    "count_rows",
    "iter_pages",
]

log = logging.getLogger(__name__)

MAX_LIMIT = 16384  # Milvus topk / query limit
_MAX_EF = 16384  # HNSW search list cap (Milvus accepts up to 32768)
_EXACT_PAGE = 4096  # rows (with vectors) per query of an exact filtered search
EXACT_THRESHOLD = 4096  # filtered searches matching at most this many rows are scored exactly

_GROWTH = 4  # a grouped search that found too few videos fetches at least 4x the segments next
_NATIVE_MIN_VERSION = (2, 4)  # Milvus servers with grouping search
GROUPINGS = ("auto", "native", "client")  # how a grouped search groups (auto: native if it can)

Hits = list[list[dict[str, Any]]]  # per query, hits best first


def check_limit(limit: Any) -> int:
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT:
        raise InvalidInputError(f"limit must be an int in 1..{MAX_LIMIT}, got {limit!r}")
    return limit


def _balanced(expr: str) -> bool:
    """Whether the parentheses of a filter balance outside its string literals, so that
    ``(expr)`` is one term when combined with other conditions (``x) or (true`` is not)."""
    depth = 0
    quote = ""
    escaped = False
    for char in expr:
        if quote:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == quote:
                quote = ""
        elif char in "\"'":
            quote = char
        elif char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
            if depth < 0:
                return False
    return depth == 0 and not quote


@dataclasses.dataclass(frozen=True)
class SearchRequest:
    """One validated search request, as the strategies pass it along."""

    vectors: np.ndarray  # float32 [Q, D]
    limit: int
    filter: str  # "" = none
    ef: int | None
    consistency_level: str | None  # None = the collection's
    group_size: int | None = None  # grouped by video: segments per video; None = rows as found
    grouping: str = "auto"  # grouped: "native" (Milvus), "client" (here) or "auto"

    @classmethod
    def of(
        cls,
        vectors: Any,
        limit: int,
        filter: str | None,  # noqa: A002 - Milvus's name
        *,
        dim: int | None,
        ef: int | None = None,
        consistency_level: str | None = None,
        group_size: int | None = None,
        grouping: str = "auto",
    ) -> SearchRequest:
        """A request of ``[Q, dim]`` (or ``[dim]``) finite query ``vectors``; ``group_size``
        (1..``MAX_LIMIT // limit``) groups the hits by video."""
        array = np.asarray(vectors, dtype=np.float32)
        if array.ndim == 1:
            array = array[None, :]
        if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] != dim:
            raise InvalidInputError(
                f"query vectors must have shape [Q, {dim}], got {list(np.shape(vectors))}"
            )
        if not np.isfinite(array).all():
            raise InvalidInputError("query vectors contain NaN/inf")
        if group_size is not None and (
            isinstance(group_size, bool)
            or not isinstance(group_size, int)
            or not 1 <= group_size <= MAX_LIMIT
        ):
            raise InvalidInputError(
                f"group_size must be an int in 1..{MAX_LIMIT}, got {group_size!r}"
            )
        if grouping not in GROUPINGS:
            raise InvalidInputError(f"grouping must be one of {GROUPINGS}, got {grouping!r}")
        return cls(
            array,
            check_limit(limit),
            filter or "",
            ef,
            consistency_level or None,
            group_size,
            grouping,
        )


def count_rows(
    connection: MilvusConnection, expr: str, consistency_level: str | None = "Strong"
) -> int:
    """Rows matching ``expr`` (all for ""); ``consistency_level`` None = the collection's."""
    where = {"filter": expr, "output_fields": ["count(*)"]}
    rows = connection.call(
        "count",
        connection.client.query,
        connection.collection,
        **where,
        **consistency(consistency_level),
    )
    return int(rows[0]["count(*)"]) if rows else 0


def iter_pages(
    connection: MilvusConnection,
    filter: str,  # noqa: A002
    fields: Sequence[str],
    consistency_level: str | None,
    page_size: int = 10000,
) -> Iterator[list[dict[str, Any]]]:
    """Pages of the rows matching ``filter`` (``fields`` only), in id order.

    Pages are id ranges ``[lo, hi)``: a range that returns more than ``page_size`` rows is
    split at the median id of what came back (one query per range; ~2N/page_size queries).
    pymilvus's query iterator is not used: against Milvus 2.3 it reads at a client-side
    timestamp and misses rows written in the last seconds.
    """
    page_size = max(1, min(int(page_size), MAX_LIMIT - 1))
    output = list(dict.fromkeys(["id", *fields]))
    kwargs = consistency(consistency_level)
    stack: list[tuple[str, str | None]] = [("", None)]
    while stack:
        low, high = stack.pop()
        parts = [f"({filter})"] if filter else []
        parts.append(f'id >= "{low}"' if low else 'id != ""')
        if high is not None:
            parts.append(f'id < "{high}"')
        rows = connection.call(
            "query",
            connection.client.query,
            connection.collection,
            filter=" and ".join(parts),
            output_fields=output,
            limit=page_size + 1,
            **kwargs,
        )
        rows = sorted(rows, key=lambda r: str(r["id"]))
        if len(rows) <= page_size:
            if rows:
                yield rows
            continue
        middle = str(rows[len(rows) // 2]["id"])  # > rows[0]: both halves hold rows
        stack.append((middle, high))
        stack.append((low, middle))


def _unit_rows(array: np.ndarray) -> np.ndarray:
    return array / np.maximum(np.linalg.norm(array, axis=1, keepdims=True), 1e-12)


class BroadSearch:
    """The search strategies of one collection.

    Args:
        connection: the collection's connection.
        index_config: the vector index definition (its ``ef`` and search parameters).
        exact_threshold: a filtered search matching at most this many rows scores them exactly;
            above it, HNSW with ``ef`` raised by the selectivity.
    """

    def __init__(
        self,
        connection: MilvusConnection,
        index_config: milvus_schema.IndexConfig,
        exact_threshold: int = EXACT_THRESHOLD,
    ) -> None:
        self._connection = connection
        self.index_config = index_config
        self.exact_threshold = exact_threshold
        self._native: bool | None = None  # Milvus grouping search usable (None: not probed)

    def forget(self) -> None:
        """Probe the collection again before the next grouped search (it was created or
        dropped: its schema may have changed)."""
        self._native = None

    def run(self, query: SearchRequest) -> Hits:
        """Per query vector, its top ``limit`` rows best first: ``{"id", "score", ...fields}``,
        each with its segment fields (``video_id``, ``segment``, ``start_s``, ``end_s``); grouped
        by video when ``query.group_size`` is set (see the module)."""
        if query.group_size is not None:
            return self._grouped(query)
        if not query.filter:
            return self._ann(query)
        return self._filtered(query)

    def _ann(self, query: SearchRequest, group_size: int | None = None) -> Hits:
        limit = query.limit
        params = self.index_config.search_params(limit * (group_size or 1))
        if query.ef is not None and "params" in params:
            params["params"]["ef"] = min(max(int(query.ef), limit), _MAX_EF)
        if "params" in params:
            params["params"]["ef"] = min(params["params"]["ef"], _MAX_EF)
        grouped = {}
        if group_size is not None:
            # strict_group_size left out: Milvus Lite 3.2.2 given False returns no group smaller
            # than group_size (measured: one-segment videos gave no hits at all)
            grouped = {"group_by_field": "video_id", "group_size": group_size}
        connection = self._connection
        results = connection.call(
            "search",
            connection.client.search,
            connection.collection,
            data=query.vectors.tolist(),
            filter=query.filter,
            limit=limit,
            output_fields=list(OUTPUT_FIELDS),
            search_params=params,
            anns_field="cls",
            **grouped,
            **consistency(query.consistency_level),
        )
        out: Hits = []
        for hits in results:
            rows = []
            for hit in hits:
                entity = hit.get("entity") or {}
                row = {"id": hit.get("id", entity.get("id")), "score": float(hit["distance"])}
                row.update(flatten(entity))
                row["id"] = str(row["id"])
                rows.append(segment_fields(row))
            out.append(rows)
        return out

    # ------------------------------------------------------------------ grouped by video
    def _grouped(self, query: SearchRequest) -> Hits:
        """Per query the segments of the top ``limit`` videos, ``group_size`` at most each."""
        size = query.group_size
        assert size is not None
        native = query.grouping == "native" or (
            query.grouping == "auto"
            and not self._connection.is_lite  # Lite: client grouping measured cheaper (module)
            and not query.filter
            and query.limit * size <= MAX_LIMIT
            and self._native_grouping()
        )
        if native:
            plain = dataclasses.replace(query, group_size=None)
            groups = [group_by_video(rows, query.limit, size) for rows in self._ann(query, size)]
            for q, found in enumerate(groups):
                self._complete(
                    plain, q, found, size
                )  # Lite groups only its top max(3·size, 10)·limit
            return [_flat(found) for found in groups]
        return self._client_grouped(query, size)

    def _native_grouping(self) -> bool:
        """Whether Milvus can group this collection's search by ``video_id``: a real field
        (schema 2) on Milvus Lite or a server >= 2.4 (probed once, see :meth:`forget`)."""
        if self._native is None:
            connection = self._connection
            description = connection.call(
                "describe", connection.client.describe_collection, connection.collection
            )
            fields = {field.get("name") for field in description.get("fields", [])}
            self._native = "video_id" in fields and (
                connection.is_lite or _version(connection) >= _NATIVE_MIN_VERSION
            )
            log.debug("%s: Milvus grouping search %s", connection.collection, self._native)
        return self._native

    def _client_grouped(self, query: SearchRequest, size: int) -> Hits:
        """Segments fetched by the plain strategies and grouped here: the first round asks
        for ``limit`` rows (a library of one segment per video needs no more), a query that
        found fewer than ``limit`` videos while matches remain asks for more (at least
        ``_GROWTH`` times, as many as its rows per video suggest; at most ``MAX_LIMIT``)."""
        limit = query.limit
        plain = dataclasses.replace(query, group_size=None)
        groups: list[list[list[dict[str, Any]]]] = [[] for _ in range(query.vectors.shape[0])]
        exhausted = [False] * len(groups)
        todo, fetch = list(range(len(groups))), limit
        while todo:
            rows_of = self.run(dataclasses.replace(plain, vectors=query.vectors[todo], limit=fetch))
            again, wanted = [], fetch * _GROWTH
            for q, rows in zip(todo, rows_of, strict=True):
                groups[q] = group_by_video(rows, limit, size)
                exhausted[q] = len(rows) < fetch
                if len(groups[q]) < limit and not exhausted[q] and fetch < MAX_LIMIT:
                    again.append(q)
                    per_video = len(rows) / max(len(groups[q]), 1)
                    wanted = max(wanted, math.ceil(1.5 * per_video * limit))
            if again:
                log.debug("grouped search: %d queries short of %d videos", len(again), limit)
            todo, fetch = again, min(wanted, MAX_LIMIT)
        for q, found in enumerate(groups):
            if not exhausted[q]:
                self._complete(plain, q, found, size)
        return [_flat(found) for found in groups]

    def _complete(
        self, query: SearchRequest, q: int, found: list[list[dict[str, Any]]], size: int
    ) -> None:
        """Fill in, in place, the videos of ``found`` that may hold more of their best
        ``size`` segments than were fetched: one filtered search on their ``video_id``."""
        short = [group for group in found if not is_complete(group, size)]
        if short and not query.filter:
            short = self._fill_by_keys(query, q, short, size)
        if not short:
            return
        expr = video_filter([group[0]["video_id"] for group in short], query.filter)
        matches = count_rows(self._connection, expr, query.consistency_level)
        if matches == 0:
            return
        request = dataclasses.replace(
            query, vectors=query.vectors[q : q + 1], filter=expr, limit=min(matches, MAX_LIMIT)
        )
        rows = self._exact(request) if matches <= self.exact_threshold else self._filtered(request)
        by_video = {group[0]["video_id"]: group for group in short}
        for row in rows[0]:
            group = by_video.get(row["video_id"])
            if group is not None and all(row["id"] != seen["id"] for seen in group):
                group.append(row)  # scores of rows already found stay Milvus's
        for group in short:
            group.sort(key=lambda row: -float(row["score"]))
            del group[size:]

    def _fill_by_keys(
        self, query: SearchRequest, q: int, short: list[list[dict[str, Any]]], size: int
    ) -> list[list[dict[str, Any]]]:
        """Fill in, in place, the videos of ``short`` by reading their rows by key (segment
        ``n`` of video ``v`` is row ``v~n``; point reads, no scan of the collection): rounds
        asking the numbers ``0..n-1`` (:func:`first_read`), then twice as many, until a video
        is all there (:func:`is_complete`: every number up to one ending at its end). The
        rows read are scored here as :meth:`_exact` scores them. Returns the videos this does
        not settle (a number missing before the video's end), for a filtered fill-in."""
        by_video = {group[0]["video_id"]: group for group in short}
        rows_of = {
            video: {int(r["segment"]): r for r in group} for video, group in by_video.items()
        }
        spans = {video: (0, first_read(group)) for video, group in by_video.items()}
        read: list[dict[str, Any]] = []
        left: list[str] = []
        while spans:
            keys = _segment_keys(spans, rows_of)
            for row in self._read_keys(keys, query.consistency_level):
                have = rows_of.get(row["video_id"]) if row["video_id"] in spans else None
                if have is not None and row["segment"] not in have:
                    have[row["segment"]] = row
                    read.append(row)
            ahead = {}
            for video, (_, high) in spans.items():
                if is_complete(list(rows_of[video].values()), MAX_SEGMENTS):
                    continue
                if high < MAX_SEGMENTS and all(n in rows_of[video] for n in range(high)):
                    ahead[video] = (high, min(2 * high, MAX_SEGMENTS))
                else:
                    left.append(video)
            spans = ahead
        if read:
            vectors = _unit_rows(np.asarray([row.pop("cls") for row in read], dtype=np.float32))
            scores = _unit_rows(query.vectors[q : q + 1]) @ vectors.T
            for row, score in zip(read, scores[0].tolist(), strict=True):
                row["score"] = float(score)
        for video, group in by_video.items():
            if video not in left:
                group[:] = sorted(rows_of[video].values(), key=lambda row: -float(row["score"]))
                del group[size:]
        return [by_video[video] for video in left]

    def _read_keys(self, keys: list[str], consistency_level: str | None) -> list[dict[str, Any]]:
        """The rows of ``keys`` that exist (``cls`` included), with their segment fields."""
        connection, out = self._connection, []
        for start in range(0, len(keys), BATCH):
            rows = connection.call(
                "get",
                connection.client.get,
                connection.collection,
                ids=keys[start : start + BATCH],
                output_fields=["cls", *OUTPUT_FIELDS],
                **consistency(consistency_level),
            )
            for row in rows:
                flat = flatten(row, drop_vector=False)
                flat["id"] = str(flat["id"])
                out.append(segment_fields(flat))
        return out

    def _filtered(self, query: SearchRequest) -> Hits:
        """A filtered search that returns every match up to ``limit``.

        HNSW with a filter walks the graph and drops the nodes that fail the filter: with a
        narrow filter the walk ends before it met ``limit`` matches (measured: 7-85 of 100
        three-id filters incomplete over 300 rows). So: count the matches first (one
        ``count(*)`` query); ``matches <= exact_threshold`` → score the matching rows exactly
        (their vectors fetched by the filter; the exact top-``limit``); otherwise search HNSW
        with ``ef`` raised by the selectivity (``ef · rows / matches``, at most 16384), and any
        query that still comes back short of ``min(limit, matches)`` is scored exactly.
        """
        if not _balanced(query.filter):
            raise InvalidInputError(
                "filter has unbalanced parentheses or an unterminated string literal"
            )
        limit = query.limit
        matches = count_rows(self._connection, query.filter, query.consistency_level)
        if matches == 0:
            return [[] for _ in range(query.vectors.shape[0])]
        if matches <= self.exact_threshold:
            return self._exact(query)
        if query.ef is None:
            total = max(count_rows(self._connection, "", query.consistency_level), matches)
            ef = math.ceil(max(self.index_config.ef, limit) * total / matches)
            query = dataclasses.replace(query, ef=ef)
        out = self._ann(query)
        short = [q for q, rows in enumerate(out) if len(rows) < min(limit, matches)]
        if short:
            log.info(
                "filtered search: %d of %d queries short of min(limit %d, matches %d); "
                "scoring them exactly",
                len(short),
                len(out),
                limit,
                matches,
            )
            exact = self._exact(dataclasses.replace(query, vectors=query.vectors[short]))
            for q, rows in zip(short, exact, strict=True):
                out[q] = rows
        return out

    def _exact(self, query: SearchRequest) -> Hits:
        """Exact cosine top-``limit`` over the rows matching ``filter`` (pages of rows, a
        running top-``limit`` per query: memory bounded by page + limit rows)."""
        limit = query.limit
        queries = _unit_rows(query.vectors)
        best_rows: list[dict[str, Any]] = []
        best_scores = np.empty((queries.shape[0], 0), dtype=np.float32)
        fields = ["id", "cls", *OUTPUT_FIELDS]
        pages = iter_pages(
            self._connection, query.filter, fields, query.consistency_level, _EXACT_PAGE
        )
        for page in pages:
            vectors = _unit_rows(np.asarray([row["cls"] for row in page], dtype=np.float32))
            scores = np.concatenate([best_scores, queries @ vectors.T], axis=1)
            candidates = best_rows + [flatten(row) for row in page]
            keep = min(limit, len(candidates))
            # per query its own top-`keep`; rows kept = union of them (bounded by Q · limit)
            top = np.argsort(-scores, axis=1, kind="stable")[:, :keep]
            union = sorted(set(top.ravel().tolist()))
            best_rows = [candidates[i] for i in union]
            best_scores = scores[:, union]
        out: Hits = []
        for q in range(queries.shape[0]):
            order = np.argsort(-best_scores[q], kind="stable")[:limit]
            hits = []
            for i in order:
                row = {"id": str(best_rows[i]["id"]), "score": float(best_scores[q, i])}
                row.update({k: v for k, v in best_rows[i].items() if k != "id"})
                hits.append(segment_fields(row))
            out.append(hits)
        return out


def _segment_keys(
    spans: dict[str, tuple[int, int]], rows_of: dict[str, dict[int, Any]]
) -> list[str]:
    """The keys of segments ``low..high-1`` of each video of ``spans`` not in ``rows_of``."""
    keys = []
    for video, (low, high) in spans.items():
        keys += [segment_key(video, n) for n in range(low, high) if n not in rows_of[video]]
    return keys


def _flat(groups: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    return [row for group in groups for row in group]


def _version(connection: MilvusConnection) -> tuple[int, ...]:
    """The server's version as numbers (``v2.3.5`` -> ``(2, 3, 5)``; unknown -> ``()``)."""
    text = str(connection.call("version", connection.client.get_server_version))
    numbers = re.findall(r"\d+", text.split("-")[0])
    return tuple(int(n) for n in numbers[:3])
