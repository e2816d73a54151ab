"""The broad-view index: one Milvus row per video (its [CLS] vector + scalar fields + metadata).

Works the same against Milvus Lite (a file path URI) and a Milvus server (``http://host:19530``
plus a token). The schema and index definition live in :mod:`tb_reranker.index.schema`.

Errors: pymilvus failures become :class:`IndexBackendError` (retriable), an unknown collection
:class:`NotFoundError`, a malformed request (bad filter, wrong dimension) :class:`InvalidInputError`,
and a collection filled by another model :class:`ModelMismatchError`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tb_reranker.errors import (
    IndexBackendError,
    InvalidInputError,
    ModelMismatchError,
    NotFoundError,
    TBError,
)
from tb_reranker.index import schema as milvus_schema
from tb_reranker.index.milvus_logs import handled_failures
from tb_reranker.index.schema import is_lite_uri
from tb_reranker.stores.record import validate_video_id, validate_video_ids

__all__ = ["VideoIndex", "ROW_FIELDS"]

# Milvus Lite 3.2's in-process gRPC server keeps gRPC's default keepalive policy (a ping without
# data at most every 5 min, GOAWAY "too_many_pings" after two early ones), while pymilvus pings
# every 10 s even with no call in flight; a shared Lite channel then dies now and then
# (UNAVAILABLE "Too many pings", seen in the test suite). A local server needs no idle pings.
LITE_GRPC_OPTIONS = {"grpc.keepalive_permit_without_calls": 0}

log = logging.getLogger(__name__)

# fields every row carries (besides dynamic metadata)
ROW_FIELDS = ("id", "cls", *milvus_schema.SCALAR_FIELDS)
_RESERVED = frozenset(ROW_FIELDS) | {"score", "$meta", "distance"}
_BATCH = 1000  # rows per upsert / ids per get/delete request
_MAX_LIMIT = 16384  # Milvus topk / query limit
_MAX_EF = 16384  # HNSW search list cap (Milvus accepts up to 32768)
_EXACT_PAGE = 4096  # rows (with vectors) per query of an exact filtered search
EXACT_THRESHOLD = 4096  # filtered searches matching at most this many rows are scored exactly


# MilvusException codes that mean "the request is malformed" (the caller's fault, not Milvus's):
# 1100 ParameterInvalid (server 2.3+); 5 IllegalArgument (legacy ErrorCode); 6 is what Milvus
# Lite 3.x sends for a filter it cannot parse or type-check ("unterminated string literal at
# column 7", "expected ')'", "comparison between incompatible types").
_INVALID_INPUT_CODES = frozenset({5, 6, 1100})


def _is_invalid_input(exc: Exception) -> bool:
    from pymilvus.exceptions import (
        DataNotMatchException,
        DataTypeNotMatchException,
        MilvusException,
        ParamError,
    )

    if isinstance(exc, ParamError | DataNotMatchException | DataTypeNotMatchException):
        return True
    code = getattr(exc, "code", None)
    if isinstance(exc, MilvusException) and code in _INVALID_INPUT_CODES:
        return True
    text = str(exc).lower()
    return any(
        marker in text
        for marker in (
            "cannot parse expression",
            "invalid expression",
            "failed to create query plan",
            "unexpected token",
            "unterminated string",
            "syntax error",
            "parse",
        )
    )


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


def _is_missing_collection(exc: Exception) -> bool:
    from pymilvus.exceptions import CollectionNotExistException

    if isinstance(exc, CollectionNotExistException) or getattr(exc, "code", None) == 100:
        return True
    text = str(exc).lower()
    return "collection" in text and ("not exist" in text or "not found" in text)


def _is_unavailable(exc: BaseException) -> bool:
    """Milvus did not answer (stopped, unreachable, timed out): our ``IndexBackendError``."""
    import grpc
    from pymilvus.exceptions import MilvusException

    if isinstance(exc, grpc.FutureTimeoutError | ConnectionError | TimeoutError):
        return True
    if isinstance(exc, grpc.RpcError) and callable(getattr(exc, "code", None)):
        return exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    text = str(exc).lower()
    return isinstance(exc, MilvusException) and (
        "fail connecting to server" in text or "server unavailable" in text
    )


def _is_handled(exc: BaseException) -> bool:
    """The failures ``VideoIndex`` expects and reports as a typed error of its own, so that
    pymilvus's traceback for them is not logged (``milvus_logs.handled_failures``)."""
    if not isinstance(exc, Exception):
        return False
    return _is_missing_collection(exc) or _is_invalid_input(exc) or _is_unavailable(exc)


def lite_path(uri: str) -> str:
    """The absolute path of a Milvus Lite URI (``./x.db``, ``~/x.db``, ``file:///x.db``)."""
    return str(Path(uri.removeprefix("file://")).expanduser().resolve())


def _positive_dim(dim: Any) -> int:
    if isinstance(dim, bool) or not isinstance(dim, int | np.integer) or dim <= 0:
        raise InvalidInputError(f"dim must be a positive int, got {dim!r}")
    return int(dim)


def _fingerprint_text(fingerprint: Any) -> str:
    if not isinstance(fingerprint, str):
        raise InvalidInputError(f"fingerprint must be a string, got {type(fingerprint).__name__}")
    return fingerprint


@dataclasses.dataclass(frozen=True)
class _Search:
    """One validated search request, as the search paths pass it along."""

    vectors: np.ndarray  # float32 [Q, D]
    limit: int
    filter: str  # "" = none
    ef: int | None
    consistency_level: str | None  # None = the collection's

    def consistency(self) -> dict[str, Any]:
        return _consistency(self.consistency_level)


def _consistency(level: str | None) -> dict[str, Any]:
    """The ``consistency_level`` keyword of a pymilvus call (none: the collection's level)."""
    return {"consistency_level": level} if level else {}


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
        self._dim = None if dim is None else _positive_dim(dim)
        self._fingerprint = None if fingerprint is None else _fingerprint_text(fingerprint)
        self._model_fingerprint = (
            None if model_fingerprint is None else _fingerprint_text(model_fingerprint)
        )
        self.timeout = timeout
        self.index_config = index or milvus_schema.IndexConfig()
        self.allow_fingerprint_mismatch = allow_fingerprint_mismatch
        self.exact_threshold = max(0, int(exact_threshold))
        self.is_lite = is_lite_uri(self.uri)
        # where, in messages: a Lite database as its absolute path, a server as its URI
        self.where = lite_path(self.uri) if self.is_lite else self.uri
        self._ready = False
        self._client = self._connect(token)
        self._database_id = self._lite_identity()  # the Lite directory this index opened

    def __repr__(self) -> str:
        return f"VideoIndex({self.uri!r}, collection={self.collection!r})"

    # ---------------------------------------------------------------- plumbing
    def _connect(self, token: str) -> Any:
        if self.is_lite:  # a path Lite cannot open, or another process's: one clear line
            from tb_reranker.index.lite import check_lite_database

            check_lite_database(Path(self.uri.removeprefix("file://")).expanduser().resolve())
        try:
            from pymilvus import MilvusClient

            options = {"grpc_options": LITE_GRPC_OPTIONS} if self.is_lite else {}
            with handled_failures(_is_unavailable):
                return MilvusClient(uri=self.uri, token=token, timeout=self.timeout, **options)
        except Exception as exc:  # noqa: BLE001
            raise IndexBackendError(f"cannot connect to Milvus at {self.where}: {exc}") from exc

    def _lite_identity(self) -> tuple[int, int] | None:
        """(device, inode) of the Lite database directory; None for a server or when absent."""
        if not self.is_lite:
            return None
        try:
            status = os.stat(self.where)
        except OSError:
            return None
        return status.st_dev, status.st_ino

    def check_database(self) -> None:
        """Milvus Lite: ``NotFoundError`` when the database directory this index opened was
        removed or replaced since. Lite's server runs in this process and keeps answering from
        memory after ``rm -rf``, so without this check a reader serves hits of a database that
        is gone (and never sees a new one at the same path). A server: nothing to check."""
        if not self.is_lite:
            return
        now = self._lite_identity()
        if now is not None and now == self._database_id:
            return
        what = "removed" if now is None else "replaced by another database"
        raise NotFoundError(
            f"Milvus Lite database {self.where} was {what} after this process opened it"
        )

    def probe(self, timeout: float) -> None:
        """One cheap round trip bounded by ``timeout`` seconds: the Lite database is still the
        one opened and the collection exists (``NotFoundError``), Milvus answers in time
        (``IndexBackendError``)."""
        self.check_database()
        if not self._call(
            "has_collection", self._client.has_collection, self.collection, timeout=timeout
        ):
            raise NotFoundError(
                f"Milvus collection {self.collection!r} does not exist at {self.where}"
            )

    def release_database(self) -> None:
        """Close this index and, for Milvus Lite, stop this process's server of its path (every
        client of the path shares it): after :meth:`check_database` failed, the next
        ``VideoIndex`` on the path then opens what is there now instead of the old server's
        memory."""
        self.close()
        if not self.is_lite:
            return
        try:
            from milvus_lite.server_manager import server_manager_instance
        except ImportError:  # pragma: no cover - milvus-lite ships with pymilvus here
            return
        server_manager_instance.release_server(self.uri)  # the key pymilvus started it with

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Run one pymilvus call with the timeout, mapping its errors to ours."""
        kwargs.setdefault("timeout", self.timeout)
        try:
            with handled_failures(_is_handled):  # no pymilvus traceback for what we map below
                return fn(*args, **kwargs)
        except TBError:
            raise
        except Exception as exc:  # noqa: BLE001 - pymilvus/grpc raise many types
            if _is_missing_collection(exc):
                raise NotFoundError(
                    f"Milvus collection {self.collection!r} does not exist at {self.where} "
                    "(create it with `tb collection create` or by ingesting videos)"
                ) from exc
            if _is_invalid_input(exc):
                raise InvalidInputError(f"Milvus rejected {what}: {exc}") from exc
            raise IndexBackendError(f"Milvus {what} failed at {self.where}: {exc}") from exc

    @property
    def dim(self) -> int | None:
        """Vector dimension D of the model bound to this index (None: not known yet)."""
        return self._dim

    @property
    def fingerprint(self) -> str | None:
        """Vision fingerprint of the model bound to this index (None: do not check the
        collection's)."""
        return self._fingerprint

    @property
    def model_fingerprint(self) -> str | None:
        """Whole-model fingerprint of the bound model (accepted on a legacy collection)."""
        return self._model_fingerprint

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
        dim = None if dim is None else _positive_dim(dim)
        fingerprint = None if fingerprint is None else _fingerprint_text(fingerprint)
        if fingerprint is not None and self._fingerprint not in (None, fingerprint):
            raise ModelMismatchError(
                f"the index expects model {self._fingerprint} but the model given is {fingerprint}"
            )
        if dim is not None and self._dim not in (None, dim):
            raise ModelMismatchError(
                f"the index holds {self._dim}-d vectors, the model makes {dim}-d ones"
            )
        if fingerprint is not None:
            self._fingerprint = fingerprint
            if model_fingerprint is not None:
                self._model_fingerprint = _fingerprint_text(model_fingerprint)
        if dim is not None:
            self._dim = dim

    @contextlib.contextmanager
    def tolerating_mismatch(self, tolerate: bool = True) -> Iterator[None]:
        """Within the block (when ``tolerate``) a fingerprint mismatch is logged, not raised:
        for reads that are harmless on another model's collection (``tb check`` listing rows)."""
        allowed = self.allow_fingerprint_mismatch
        self.allow_fingerprint_mismatch = allowed or tolerate
        try:
            yield
        finally:
            self.allow_fingerprint_mismatch = allowed

    @property
    def client(self) -> Any:
        """The underlying ``pymilvus.MilvusClient`` (for advanced use)."""
        return self._client

    def exists(self) -> bool:
        return bool(self._call("has_collection", self._client.has_collection, self.collection))

    def describe(self) -> dict[str, Any]:
        """JSON-friendly collection summary (see :func:`tb_reranker.index.schema.describe_collection`)."""
        return self._call(
            "describe", milvus_schema.describe_collection, self._client, self.collection
        )

    def stored_fingerprint(self) -> str | None:
        """The fingerprint recorded on the collection (vision, or legacy whole-model)."""
        return self.stored_identity().value

    def stored_identity(self) -> milvus_schema.StoredIdentity:
        """What the collection records about the model that filled it."""
        desc = self._call("describe", self._client.describe_collection, self.collection)
        return milvus_schema.collection_identity(desc)

    def _accepts(self, stored: milvus_schema.StoredIdentity) -> bool:
        """Whether the bound model may read/write a collection recording ``stored``."""
        if self.fingerprint is None or stored.value is None:
            return True
        if stored.legacy:  # a whole-model fingerprint: only that very model
            return stored.value in (self._model_fingerprint, self.fingerprint)
        return stored.value == self.fingerprint

    def mismatch_message(self, stored: milvus_schema.StoredIdentity) -> str:
        """Why the bound model may not use a collection recording ``stored``, and what to run."""
        reindex = (
            "re-index the videos with this checkpoint into a new collection and store: `tb ingest "
            "VIDEOS --checkpoint CHECKPOINT --collection NEW_NAME --store NEW_DIR` (or drop this "
            "one first: `tb collection drop --yes`)"
        )
        if stored.legacy:
            return (
                f"collection {self.collection!r} was filled before vision fingerprints existed "
                f"and records model {stored.value}, not the loaded model "
                f"{self._model_fingerprint or self.fingerprint}. If you have the checkpoint that "
                "filled it, run `tb migrate --checkpoint THAT_CHECKPOINT` once (it verifies that "
                "checkpoint, records its vision fingerprint and re-encodes nothing); then every "
                f"checkpoint with the same vision side serves it. Otherwise {reindex}"
            )
        return (
            f"collection {self.collection!r} holds vectors of vision model {stored.value} but "
            f"the loaded checkpoint's vision side is {self.fingerprint} (its vision tower, frame "
            "sampling or normalisation differ; a checkpoint trained with --freeze-backbone from "
            f"the one that filled it would match); search results would be meaningless. Serve "
            f"a checkpoint with that vision side, or {reindex}"
        )

    def stored_dim(self) -> int | None:
        desc = self._call("describe", self._client.describe_collection, self.collection)
        for field in desc.get("fields", []):
            if field.get("name") == "cls":
                return int(field["params"]["dim"])
        return None

    def _check_compatible(self, desc: dict[str, Any]) -> bool:
        """Raise on a dim/fingerprint mismatch; True when a fingerprint mismatch was allowed."""
        dim = None
        for field in desc.get("fields", []):
            if field.get("name") == "cls":
                dim = int(field["params"]["dim"])
        if self._dim is None:
            self._dim = dim
        elif dim is not None and dim != self._dim:
            raise ModelMismatchError(
                f"collection {self.collection!r} holds {dim}-d vectors but the model makes "
                f"{self.dim}-d ones; use another collection or re-create it"
            )
        stored = milvus_schema.collection_identity(desc)
        if not self._accepts(stored):
            message = self.mismatch_message(stored)
            if not self.allow_fingerprint_mismatch:
                raise ModelMismatchError(message)
            log.warning("%s (allowed)", message)
            return True
        return False

    def _ensure_ready(self) -> None:
        """Check the collection exists and matches the model, and load it (once per instance)."""
        if self._ready:
            return
        desc = self._call("describe", self._client.describe_collection, self.collection)
        tolerated = self._check_compatible(desc)
        # Milvus Lite 3.x reopens collections released; servers keep them loaded. Loading an
        # already loaded collection is a cheap no-op.
        self._call("load", self._client.load_collection, self.collection)
        self._ready = not tolerated  # a tolerated mismatch is checked again on every call

    def check_fingerprint(self) -> bool:
        """True when the collection may be used by the bound model: its vision fingerprint is
        the model's, or (a legacy collection) its whole-model fingerprint is, or either is
        unknown."""
        return self._accepts(self.stored_identity())

    # ---------------------------------------------------------------- lifecycle
    def create(self, *, exist_ok: bool = True) -> bool:
        """Create the collection (schema, HNSW/COSINE index, fingerprint) and load it.

        Returns True when it was created, False when it existed (then it is checked against
        ``dim`` and ``fingerprint``). ``exist_ok=False`` raises ``AlreadyExistsError`` instead.
        """
        from tb_reranker.errors import AlreadyExistsError

        if self.exists():
            if not exist_ok:
                raise AlreadyExistsError(f"collection {self.collection!r} exists at {self.where}")
            self._ready = False
            self._ensure_ready()
            return False
        if self.dim is None:
            raise InvalidInputError("creating a collection needs dim (the model's embed_dim)")
        self.index_config = self._call(
            "create_collection",
            milvus_schema.create_collection,
            self._client,
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
        return bool(
            self._call("drop", milvus_schema.drop_collection, self._client, self.collection)
        )

    def set_fingerprint(self, fingerprint: str) -> None:
        """Record the vision ``fingerprint`` on the collection (adopting it for an empty or
        unmarked one, or for a migrated one)."""
        fingerprint = _fingerprint_text(fingerprint)
        self._call(
            "alter_collection_properties",
            milvus_schema.set_fingerprint,
            self._client,
            self.collection,
            fingerprint,
        )
        self._fingerprint = fingerprint

    def close(self) -> None:
        try:
            self._client.close()
        except Exception:  # noqa: BLE001 - closing twice or a dead server is fine
            log.debug("closing Milvus client failed", exc_info=True)

    def __enter__(self) -> VideoIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------- rows
    def _vector(self, value: Any, what: str) -> list[float]:
        array = np.asarray(value, dtype=np.float32)
        if array.ndim != 1 or (self.dim is not None and array.shape[0] != self.dim):
            raise InvalidInputError(
                f"{what}: vector must have shape [{self.dim}], got {list(array.shape)}"
            )
        if not np.isfinite(array).all():
            raise InvalidInputError(f"{what}: vector contains NaN/inf")
        return array.tolist()

    def _row(self, row: Mapping[str, Any]) -> dict[str, Any]:
        if not isinstance(row, Mapping):
            raise InvalidInputError(f"a row must be a dict, got {type(row).__name__}")
        video_id = validate_video_id(row.get("id"))
        out = dict(row)
        out["cls"] = self._vector(row.get("cls"), f"row {video_id!r}")
        out["uri"] = str(row.get("uri", ""))
        duration = float(row.get("duration_s", 0.0))
        if not math.isfinite(duration) or duration < 0:
            raise InvalidInputError(f"row {video_id!r}: bad duration_s {duration!r}")
        out["duration_s"] = duration
        out["num_frames"] = int(row.get("num_frames", 0))
        out["content_hash"] = str(row.get("content_hash", ""))
        if len(out["uri"].encode()) > milvus_schema.URI_MAX_LENGTH:
            raise InvalidInputError(
                f"row {video_id!r}: uri longer than {milvus_schema.URI_MAX_LENGTH} bytes"
            )
        for key, value in out.items():
            if key.startswith("$"):
                raise InvalidInputError(f"row {video_id!r}: field name {key!r} is reserved")
            if isinstance(value, np.generic):
                out[key] = value.item()
        return out

    def upsert(self, rows: Iterable[Mapping[str, Any]]) -> int:
        """Insert or replace rows by id: ``{"id", "cls" [D], "uri", "duration_s", "num_frames",
        "content_hash", **metadata}``. Returns the number of rows written."""
        self._ensure_ready()
        prepared = [self._row(r) for r in rows]
        ids = [r["id"] for r in prepared]
        if len(set(ids)) != len(ids):
            dupes = sorted({i for i in ids if ids.count(i) > 1})
            raise InvalidInputError(f"duplicate ids in one upsert: {dupes[:10]}")
        if prepared and self.fingerprint and not self.stored_fingerprint():
            self.set_fingerprint(self.fingerprint)  # first writer marks an unmarked collection
        for start in range(0, len(prepared), _BATCH):
            self._call(
                "upsert", self._client.upsert, self.collection, prepared[start : start + _BATCH]
            )
        return len(prepared)

    def _output_fields(self) -> list[str]:
        # the scalar fields + "$meta" (every dynamic field), not the D-float vector; Milvus Lite
        # 2.5/3.x and the 2.3 server all accept this list
        return [*milvus_schema.SCALAR_FIELDS, "$meta"]

    @staticmethod
    def _flatten(entity: Mapping[str, Any], drop_vector: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in entity.items():
            if key == "$meta" and isinstance(value, Mapping):
                out.update(value)
            elif key == "cls" and drop_vector:
                continue
            else:
                out[key] = value
        return out

    def search(
        self,
        vectors: Any,
        limit: int,
        filter: str | None = None,  # noqa: A002 - Milvus's name
        *,
        ef: int | None = None,
        consistency_level: str | None = None,
    ) -> list[list[dict[str, Any]]]:
        """Top-``limit`` videos by cosine similarity for each query vector, in one call.

        Args:
            vectors: ``[Q, D]`` (or ``[D]`` for one query) float array.
            limit: hits per query (1..16384).
            filter: a Milvus boolean expression over scalar/dynamic fields (``"duration_s > 3"``).
            ef: HNSW search list (default ``max(index.ef, limit)``).
            consistency_level: e.g. ``"Strong"`` to see writes made just before.
        Returns:
            per query, hits best first: ``{"id", "score" (cosine), "uri", "duration_s",
            "num_frames", "content_hash", **metadata}``.
        """
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= _MAX_LIMIT:
            raise InvalidInputError(f"limit must be an int in 1..{_MAX_LIMIT}, got {limit!r}")
        self._ensure_ready()
        array = np.asarray(vectors, dtype=np.float32)
        if array.ndim == 1:
            array = array[None, :]
        if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] != self.dim:
            raise InvalidInputError(
                f"query vectors must have shape [Q, {self.dim}], got {list(np.shape(vectors))}"
            )
        if not np.isfinite(array).all():
            raise InvalidInputError("query vectors contain NaN/inf")
        query = _Search(array, limit, filter or "", ef, consistency_level or None)
        if not query.filter:
            return self._ann_search(query)
        return self._filtered_search(query)

    def _ann_search(self, query: _Search) -> list[list[dict[str, Any]]]:
        limit = query.limit
        params = self.index_config.search_params(limit)
        if query.ef is not None and "params" in params:
            params["params"]["ef"] = min(max(int(query.ef), limit), _MAX_EF)
        results = self._call(
            "search",
            self._client.search,
            self.collection,
            data=query.vectors.tolist(),
            filter=query.filter,
            limit=limit,
            output_fields=self._output_fields(),
            search_params=params,
            anns_field="cls",
            **query.consistency(),
        )
        out: list[list[dict[str, Any]]] = []
        for hits in results:
            rows = []
            for hit in hits:
                entity = hit.get("entity") or {}
                row = {"id": hit.get("id", entity.get("id")), "score": float(hit["distance"])}
                row.update(self._flatten(entity))
                row["id"] = str(row["id"])
                rows.append(row)
            out.append(rows)
        return out

    def _filtered_search(self, query: _Search) -> list[list[dict[str, Any]]]:
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
        matches = self._count(query.filter, query.consistency_level)
        if matches == 0:
            return [[] for _ in range(query.vectors.shape[0])]
        if matches <= self.exact_threshold:
            return self._exact_search(query)
        if query.ef is None:
            total = max(self._count("", query.consistency_level), matches)
            ef = math.ceil(max(self.index_config.ef, limit) * total / matches)
            query = dataclasses.replace(query, ef=ef)
        out = self._ann_search(query)
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
            exact = self._exact_search(dataclasses.replace(query, vectors=query.vectors[short]))
            for q, rows in zip(short, exact, strict=True):
                out[q] = rows
        return out

    def _exact_search(self, query: _Search) -> list[list[dict[str, Any]]]:
        """Exact cosine top-``limit`` over the rows matching ``filter`` (pages of rows, a
        running top-``limit`` per query: memory bounded by page + limit rows)."""
        array, limit = query.vectors, query.limit
        queries = array / np.maximum(np.linalg.norm(array, axis=1, keepdims=True), 1e-12)
        best_rows: list[dict[str, Any]] = []
        best_scores = np.empty((array.shape[0], 0), dtype=np.float32)
        fields = ["id", "cls", *self._output_fields()]
        pages = self._iter_pages(query.filter, fields, query.consistency_level, _EXACT_PAGE)
        for page in pages:
            vectors = np.asarray([row["cls"] for row in page], dtype=np.float32)
            vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
            rows = [self._flatten(row) for row in page]
            scores = np.concatenate([best_scores, queries @ vectors.T], axis=1)
            candidates = best_rows + rows
            keep = min(limit, len(candidates))
            # per query its own top-`keep`; rows kept = union of them (bounded by Q · limit)
            top = np.argsort(-scores, axis=1, kind="stable")[:, :keep]
            union = sorted(set(top.ravel().tolist()))
            best_rows = [candidates[i] for i in union]
            best_scores = scores[:, union]
        out: list[list[dict[str, Any]]] = []
        for q in range(array.shape[0]):
            order = np.argsort(-best_scores[q], kind="stable")[:limit]
            hits = []
            for i in order:
                row = {"id": str(best_rows[i]["id"]), "score": float(best_scores[q, i])}
                row.update({k: v for k, v in best_rows[i].items() if k != "id"})
                hits.append(row)
            out.append(hits)
        return out

    def get(
        self, ids: Sequence[str], *, with_vectors: bool = False, consistency_level: str = "Strong"
    ) -> dict[str, dict[str, Any]]:
        """Rows of ``ids`` that exist, by id (``cls`` included as float32 arrays on request)."""
        wanted = validate_video_ids(ids)
        self._ensure_ready()
        out: dict[str, dict[str, Any]] = {}
        for start in range(0, len(wanted), _BATCH):
            chunk = wanted[start : start + _BATCH]
            rows = self._call(
                "get",
                self._client.get,
                self.collection,
                ids=chunk,
                output_fields=["*"],
                consistency_level=consistency_level,
            )
            for row in rows:
                flat = self._flatten(row, drop_vector=not with_vectors)
                if with_vectors:
                    flat["cls"] = np.asarray(flat["cls"], dtype=np.float32)
                out[str(flat["id"])] = flat
        return out

    def delete(self, ids: Sequence[str]) -> int:
        """Delete rows by id (missing ids ignored). Returns how many ids were requested."""
        wanted = validate_video_ids(ids)
        self._ensure_ready()
        for start in range(0, len(wanted), _BATCH):
            self._call(
                "delete", self._client.delete, self.collection, ids=wanted[start : start + _BATCH]
            )
        return len(wanted)

    def _count(self, expr: str, consistency_level: str | None = "Strong") -> int:
        """Rows matching ``expr`` (all for ""); ``consistency_level`` None = the collection's."""
        where = {"filter": expr, "output_fields": ["count(*)"]}
        rows = self._call(
            "count", self._client.query, self.collection, **where, **_consistency(consistency_level)
        )
        return int(rows[0]["count(*)"]) if rows else 0

    def iter_rows(
        self, fields: Sequence[str] = ("id",), *, page_size: int = 10000
    ) -> Iterator[dict[str, Any]]:
        """Every row (only ``fields``) in id order, with Strong consistency, one page per query.

        Pages are id ranges ``[lo, hi)``: a range that returns more than ``page_size`` rows is
        split at the median id of what came back (one query per range; ~2N/page_size queries).
        pymilvus's query iterator is not used: against Milvus 2.3 it reads at a client-side
        timestamp and misses rows written in the last seconds.
        """
        self._ensure_ready()
        for page in self._iter_pages("", ("id", *fields), "Strong", page_size):
            for row in page:
                yield self._flatten(row)

    def _iter_pages(
        self,
        filter: str,  # noqa: A002
        fields: Sequence[str],
        consistency_level: str | None,
        page_size: int = 10000,
    ) -> Iterator[list[dict[str, Any]]]:
        """Pages of the rows matching ``filter`` (``fields`` only), in id order.

        Pages are id ranges ``[lo, hi)``: a range that returns more than ``page_size`` rows is
        split at the median id of what came back (one query per range; ~2N/page_size queries).
        """
        page_size = max(1, min(int(page_size), _MAX_LIMIT - 1))
        output = list(dict.fromkeys(["id", *fields]))
        kwargs = _consistency(consistency_level)
        stack: list[tuple[str, str | None]] = [("", None)]
        while stack:
            low, high = stack.pop()
            parts = [f"({filter})"] if filter else []
            parts.append(f'id >= "{low}"' if low else 'id != ""')
            if high is not None:
                parts.append(f'id < "{high}"')
            rows = self._call(
                "query",
                self._client.query,
                self.collection,
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

    def list_ids(self) -> list[str]:
        """Every video id in the collection (sorted)."""
        return sorted(str(row["id"]) for row in self.iter_rows(("id",)))

    def count(self) -> int:
        """Rows in the collection (exact, Strong consistency)."""
        self._ensure_ready()
        return self._count("")

    def flush(self) -> None:
        """Seal the rows written so far so that the vector index covers them.

        Worth one call after a batch of writes: unsealed ("growing") rows are searched by brute
        force, which in Milvus Lite 3.x costs ~6x more per search (measured: 370 ms -> 62 ms
        at 3,000 x 512 on a loaded 2-core machine). ``ingest`` flushes once at the end.
        """
        self._ensure_ready()
        self._call("flush", self._client.flush, self.collection)

    def wait_until_indexed(self, timeout: float = 60.0) -> None:
        """Flush and wait until the vector index covers every row (server; no-op on Lite)."""
        import time

        if self.is_lite:
            return
        self._ensure_ready()
        self._call("flush", self._client.flush, self.collection)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self._call("describe_index", self._client.describe_index, self.collection, "cls")
            if (
                info
                and int(info.get("pending_index_rows", 0)) == 0
                and info.get("state")
                in (
                    "Finished",
                    None,
                )
            ):
                return
            time.sleep(0.2)
        raise IndexBackendError(f"index of {self.collection!r} not built after {timeout:.0f} s")
