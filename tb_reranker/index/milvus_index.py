"""The broad-view index: one Milvus row per video (its [CLS] vector + scalar fields + metadata).

Works the same against Milvus Lite (a file path URI) and a Milvus server (``http://host:19530``
plus a token). :class:`VideoIndex` is a facade in the style of pymilvus's ``MilvusClient``: each
verb normalises its arguments, makes its call(s) and converts the answer. The work is done by
one module per job:

- :mod:`tb_reranker.index.connection`: the pymilvus client, every call with its timeout, the
  error mapping, the Lite database this index opened;
- :mod:`tb_reranker.index.identity`: the model bound to the index and the collection properties
  recording the model that filled it;
- :mod:`tb_reranker.index.search`: the search strategies and reading rows page by page;
- :mod:`tb_reranker.index.entities`: rows checked before a write and flattened after a read;
- :mod:`tb_reranker.index.schema`: the schema and index definition.

Errors: pymilvus failures become :class:`IndexUnavailableError` (retriable), an unknown collection
:class:`NotFoundError`, a malformed request (bad filter, wrong dimension) :class:`InvalidInputError`,
and a collection filled by another model :class:`ModelMismatchError`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from tb_reranker.errors import (
    AlreadyExistsError,
    IndexUnavailableError,
    InvalidInputError,
    NotFoundError,
)
from tb_reranker.index import identity
from tb_reranker.index import schema as milvus_schema
from tb_reranker.index.connection import LITE_GRPC_OPTIONS as LITE_GRPC_OPTIONS
from tb_reranker.index.connection import MilvusConnection
from tb_reranker.index.connection import lite_path as lite_path
from tb_reranker.index.entities import BATCH, ROW_FIELDS, flatten, prepare_rows
from tb_reranker.index.search import EXACT_THRESHOLD as EXACT_THRESHOLD
from tb_reranker.index.search import (
    BroadSearch,
    SearchRequest,
    check_limit,
    count_rows,
    iter_pages,
)
from tb_reranker.stores.record import validate_record_keys

__all__ = ["VideoIndex", "ROW_FIELDS"]


class VideoIndex:
    """The Milvus collection of video [CLS] vectors.

    Args:
        uri: a file path (Milvus Lite) or ``http://host:19530`` (server).
        token: ``user:password`` or API key for a server ("" for none / Lite).
        collection: collection name.
        dim: vector dimension D; needed by :meth:`create`, checked against an existing collection.
        fingerprint: vision fingerprint of the model producing the vectors
            (``TokenBinder.vision_fingerprint()``); checked against the collection's,
            :class:`ModelMismatchError` when they differ (None = do not check).
        model_fingerprint: that model's whole-model fingerprint: a collection written before the
            identity was split (it records a whole-model fingerprint) is accepted when it is
            this one, and refused otherwise until ``tb migrate``.
        timeout: seconds for every Milvus call.
        index: the vector index definition (HNSW M 16 / efConstruction 200 / ef 64 by default).
        allow_fingerprint_mismatch: escape hatch: warn instead of raising on a mismatch.
        exact_threshold: a filtered search matching at most this many rows scores them exactly
            (complete and exact); above it, HNSW with ``ef`` raised by the selectivity.
    """

    def __init__(
        self,
        uri: str,
        *,
        token: str = "",
        collection: str = "tb_videos",
        dim: int | None = None,
        fingerprint: str | None = None,
        model_fingerprint: str | None = None,
        timeout: float = 30.0,
        index: milvus_schema.IndexConfig | None = None,
        allow_fingerprint_mismatch: bool = False,
        exact_threshold: int = EXACT_THRESHOLD,
    ) -> None:
        if not uri:
            raise InvalidInputError("empty Milvus URI")
        self.uri = str(uri)
        self.collection = collection
        self.timeout = timeout
        # checked before connecting: a bad dim, fingerprint or threshold opens nothing
        threshold = max(0, int(exact_threshold))
        self._binding = identity.ModelBinding(
            collection,
            dim=dim,
            fingerprint=fingerprint,
            model_fingerprint=model_fingerprint,
            allow_mismatch=allow_fingerprint_mismatch,
        )
        self._ready = False
        self._connection = MilvusConnection(
            self.uri, token=token, collection=collection, timeout=timeout
        )
        self.is_lite = self._connection.is_lite
        # where, in messages: a Lite database as its absolute path, a server as its URI
        self.where = self._connection.where
        self._search = BroadSearch(
            self._connection,
            index or milvus_schema.IndexConfig(),
            threshold,
        )

    def __repr__(self) -> str:
        return f"VideoIndex({self.uri!r}, collection={self.collection!r})"

    # ---------------------------------------------------------------- settings
    @property
    def client(self) -> Any:
        """The underlying ``pymilvus.MilvusClient`` (for advanced use)."""
        return self._connection.client

    @property
    def index_config(self) -> milvus_schema.IndexConfig:
        """The vector index definition (the collection's own after :meth:`create`)."""
        return self._search.index_config

    @index_config.setter
    def index_config(self, config: milvus_schema.IndexConfig) -> None:
        self._search.index_config = config

    @property
    def exact_threshold(self) -> int:
        """Filtered searches matching at most this many rows are scored exactly."""
        return self._search.exact_threshold

    @exact_threshold.setter
    def exact_threshold(self, threshold: int) -> None:
        self._search.exact_threshold = max(0, int(threshold))

    @property
    def allow_fingerprint_mismatch(self) -> bool:
        """Warn instead of raising when the collection belongs to another model."""
        return self._binding.allow_mismatch

    @allow_fingerprint_mismatch.setter
    def allow_fingerprint_mismatch(self, allow: bool) -> None:
        self._binding.allow_mismatch = allow

    # ---------------------------------------------------------------- the bound model
    @property
    def dim(self) -> int | None:
        """Vector dimension D of the model bound to this index (None: not known yet)."""
        return self._binding.dim

    @property
    def fingerprint(self) -> str | None:
        """Vision fingerprint of the model bound to this index (None: do not check the
        collection's)."""
        return self._binding.fingerprint

    @property
    def model_fingerprint(self) -> str | None:
        """Whole-model fingerprint of the bound model (accepted on a legacy collection)."""
        return self._binding.model_fingerprint

    def bind(
        self,
        *,
        fingerprint: str | None = None,
        dim: int | None = None,
        model_fingerprint: str | None = None,
    ) -> None:
        """Bind this index to a model: adopt its (vision) ``fingerprint``, ``dim`` and
        ``model_fingerprint`` where none is set.

        Raises:
            InvalidInputError: ``dim`` is not a positive int or ``fingerprint`` not a string.
            ModelMismatchError: the index is bound to another fingerprint or dimension (then
                nothing changes).
        """
        self._binding.bind(fingerprint=fingerprint, dim=dim, model_fingerprint=model_fingerprint)

    def tolerating_mismatch(self, tolerate: bool = True) -> contextlib.AbstractContextManager[None]:
        """Within the block (when ``tolerate``) a fingerprint mismatch is logged, not raised:
        for reads that are harmless on another model's collection (``tb check`` listing rows)."""
        return self._binding.tolerating(tolerate)

    def stored_fingerprint(self) -> str | None:
        """The fingerprint recorded on the collection (vision, or legacy whole-model)."""
        return self.stored_identity().value

    def stored_identity(self) -> milvus_schema.StoredIdentity:
        """What the collection records about the model that filled it."""
        return identity.stored_identity(self._connection)

    def stored_dim(self) -> int | None:
        return identity.vector_dim(identity.description(self._connection))

    def mismatch_message(self, stored: milvus_schema.StoredIdentity) -> str:
        """Why the bound model may not use a collection recording ``stored``, and what to run."""
        return self._binding.mismatch_message(stored)

    def check_fingerprint(self) -> bool:
        """True when the collection may be used by the bound model: its vision fingerprint is
        the model's, or (a legacy collection) its whole-model fingerprint is, or either is
        unknown."""
        return self._binding.accepts(self.stored_identity())

    def set_fingerprint(self, fingerprint: str) -> None:
        """Record the vision ``fingerprint`` on the collection (adopting it for an empty or
        unmarked one, or for a migrated one)."""
        fingerprint = identity.fingerprint_text(fingerprint)
        identity.record_fingerprint(self._connection, fingerprint)
        self._binding.fingerprint = fingerprint

    def _ensure_ready(self) -> None:
        """Check the collection exists and matches the model, and load it (once per instance)."""
        if self._ready:
            return
        tolerated = self._binding.check(identity.description(self._connection))
        # Milvus Lite 3.x reopens collections released; servers keep them loaded. Loading an
        # already loaded collection is a cheap no-op.
        self._call("load", self.client.load_collection, self.collection)
        self._ready = not tolerated  # a tolerated mismatch is checked again on every call

    # ---------------------------------------------------------------- connection
    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Run one pymilvus call with the timeout, mapping its errors to ours."""
        return self._connection.call(what, fn, *args, **kwargs)

    def check_database(self) -> None:
        """Milvus Lite: ``NotFoundError`` when the database directory this index opened was
        removed or replaced since. Lite's server runs in this process and keeps answering from
        memory after ``rm -rf``, so without this check a reader serves hits of a database that
        is gone (and never sees a new one at the same path). A server: nothing to check."""
        self._connection.check_database()

    def probe(self, timeout: float) -> None:
        """One cheap round trip bounded by ``timeout`` seconds: the Lite database is still the
        one opened and the collection exists (``NotFoundError``), Milvus answers in time
        (``IndexUnavailableError``)."""
        self.check_database()
        if not self._call(
            "has_collection", self.client.has_collection, self.collection, timeout=timeout
        ):
            raise NotFoundError(
                f"Milvus collection {self.collection!r} does not exist at {self.where}"
            )

    def release_database(self) -> None:
        """Close this index and, for Milvus Lite, stop this process's server of its path (every
        client of the path shares it): after :meth:`check_database` failed, the next
        ``VideoIndex`` on the path then opens what is there now instead of the old server's
        memory."""
        self._connection.release_database()

    def close(self) -> None:
        self._connection.close()

    def __enter__(self) -> VideoIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------- lifecycle
    def exists(self) -> bool:
        return bool(self._call("has_collection", self.client.has_collection, self.collection))

    def describe(self) -> dict[str, Any]:
        """JSON-friendly collection summary (see :func:`tb_reranker.index.schema.describe_collection`)."""
        return self._call(
            "describe", milvus_schema.describe_collection, self.client, self.collection
        )

    def create(self, *, exist_ok: bool = True) -> bool:
        """Create the collection (schema, HNSW/COSINE index, fingerprint) and load it.

        Returns True when it was created, False when it existed (then it is checked against
        ``dim`` and ``fingerprint``). ``exist_ok=False`` raises ``AlreadyExistsError`` instead.
        """
        if self.exists():
            if not exist_ok:
                raise AlreadyExistsError(f"collection {self.collection!r} exists at {self.where}")
            self._ready = False
            self._ensure_ready()
            return False
        if self.dim is None:
            raise InvalidInputError("creating a collection needs dim (the model's embed_dim)")
        self._search.forget()
        self.index_config = self._call(
            "create_collection",
            milvus_schema.create_collection,
            self.client,
            self.collection,
            self.dim,
            fingerprint=self.fingerprint or "",
            index=self.index_config,
        )
        self._ready = True
        return True

    def drop(self) -> bool:
        """Drop the collection; False when it did not exist."""
        self._ready = False
        self._search.forget()
        return bool(self._call("drop", milvus_schema.drop_collection, self.client, self.collection))

    # ---------------------------------------------------------------- rows
    def upsert(self, rows: Iterable[Mapping[str, Any]]) -> int:
        """Insert or replace rows by id: ``{"id", "cls" [D], "uri", "duration_s", "num_frames",
        "content_hash", **metadata}``. Returns the number of rows written."""
        self._ensure_ready()
        prepared = prepare_rows(rows, self.dim)
        if prepared and self.fingerprint and not self.stored_fingerprint():
            self.set_fingerprint(self.fingerprint)  # first writer marks an unmarked collection
        for start in range(0, len(prepared), BATCH):
            batch = prepared[start : start + BATCH]
            self._call("upsert", self.client.upsert, self.collection, batch)
        return len(prepared)

    def search(
        self,
        vectors: Any,
        limit: int,
        filter: str | None = None,  # noqa: A002 - Milvus's name
        *,
        ef: int | None = None,
        consistency_level: str | None = None,
        group_size: int | None = None,
        grouping: str = "auto",
    ) -> list[list[dict[str, Any]]]:
        """Top-``limit`` rows (segments) by cosine similarity for each query vector, in one
        call; with ``group_size``, the segments of the top-``limit`` videos instead.

        Args:
            vectors: ``[Q, D]`` (or ``[D]`` for one query) float array.
            limit: hits per query (1..16384): rows, or videos when grouped.
            filter: a Milvus boolean expression over scalar/dynamic fields (``"duration_s > 3"``;
                ``'video_id == "clip01"'``: the segments of one video).
            ef: HNSW search list (default ``max(index.ef, limit)``).
            consistency_level: e.g. ``"Strong"`` to see writes made just before.
            group_size: group by video: each video's best ``group_size`` segments, videos in
                order of their best segment (see :mod:`tb_reranker.index.search`).
            grouping: how to group: ``"auto"`` (Milvus grouping search where the engine and the
                collection have it), ``"native"`` or ``"client"`` (forced).
        Returns:
            per query, rows best first (grouped: videos best first, each video's segments
            together, best first): ``{"id" (the segment key), "score" (cosine), "uri",
            "duration_s", "num_frames", "content_hash", "video_id", "segment", "start_s",
            "end_s", **metadata}``.
        """
        check_limit(limit)
        self._ensure_ready()
        self.check_database()  # a stat: a Lite database removed under any reader is never read
        query = SearchRequest.of(
            vectors,
            limit,
            filter,
            dim=self.dim,
            ef=ef,
            consistency_level=consistency_level,
            group_size=group_size,
            grouping=grouping,
        )
        return self._search.run(query)

    def get(
        self, ids: Sequence[str], *, with_vectors: bool = False, consistency_level: str = "Strong"
    ) -> dict[str, dict[str, Any]]:
        """Rows of ``ids`` (record keys) that exist, by id (``cls`` included as float32 arrays on
        request)."""
        wanted = validate_record_keys(ids)
        self._ensure_ready()
        out: dict[str, dict[str, Any]] = {}
        for start in range(0, len(wanted), BATCH):
            rows = self._call(
                "get",
                self.client.get,
                self.collection,
                ids=wanted[start : start + BATCH],
                output_fields=["*"],
                consistency_level=consistency_level,
            )
            for row in rows:
                flat = flatten(row, drop_vector=not with_vectors)
                if with_vectors:
                    flat["cls"] = np.asarray(flat["cls"], dtype=np.float32)
                out[str(flat["id"])] = flat
        return out

    def delete(self, ids: Sequence[str]) -> int:
        """Delete rows by id (record keys; missing ids ignored). Returns how many ids were
        requested."""
        wanted = validate_record_keys(ids)
        self._ensure_ready()
        for start in range(0, len(wanted), BATCH):
            batch = wanted[start : start + BATCH]
            self._call("delete", self.client.delete, self.collection, ids=batch)
        return len(wanted)

    def iter_rows(
        self, fields: Sequence[str] = ("id",), *, filter: str = "", page_size: int = 10000
    ) -> Iterator[dict[str, Any]]:
        """Every row (only ``fields`` and the segment fields) matching ``filter`` in id order,
        with Strong consistency, one page per query (see :func:`.search.iter_pages`)."""
        self._ensure_ready()
        fields = ("id", *fields, *milvus_schema.SEGMENT_FIELDS)  # see entities.flatten
        for page in iter_pages(self._connection, filter, fields, "Strong", page_size):
            for row in page:
                yield flatten(row)

    def list_ids(self) -> list[str]:
        """Every video id in the collection (sorted)."""
        return sorted(str(row["id"]) for row in self.iter_rows(("id",)))

    def count(self) -> int:
        """Rows in the collection (exact, Strong consistency)."""
        self._ensure_ready()
        return count_rows(self._connection, "")

    def flush(self) -> None:
        """Seal the rows written so far so that the vector index covers them.

        Worth one call after a batch of writes: unsealed ("growing") rows are searched by brute
        force, which in Milvus Lite 3.x costs ~6x more per search (measured: 370 ms -> 62 ms
        at 3,000 x 512 on a loaded 2-core machine). ``ingest`` flushes once at the end.
        """
        self._ensure_ready()
        self._call("flush", self.client.flush, self.collection)

    def wait_until_indexed(self, timeout: float = 60.0) -> None:
        """Flush and wait until the vector index covers every row (server; no-op on Lite)."""
        if self.is_lite:
            return
        self.flush()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self._call("describe_index", self.client.describe_index, self.collection, "cls")
            pending = int(info.get("pending_index_rows", 0)) if info else None
            if pending == 0 and info.get("state") in ("Finished", None):
                return
            time.sleep(0.2)
        raise IndexUnavailableError(f"index of {self.collection!r} not built after {timeout:.0f} s")
