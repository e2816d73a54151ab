"""The Milvus collection that holds one row per video segment: schema, index and metadata.

Fields (the primary key is the segment's record key, ``tb_reranker.stores.segment_key``: the
video id for segment 0, ``<video id>~<n>`` for segment n >= 1):

========================  ===================  ===============================================
field                     type                 meaning
========================  ===================  ===============================================
``id``                    VARCHAR(512), PK     record key (validated by ``tb_reranker.stores``)
``cls``                   FLOAT_VECTOR(D)      L2-normalised segment [CLS] = mean of its frames
``uri``                   VARCHAR(4096)        where the video file lives
``duration_s``            FLOAT                the whole video's duration in seconds
``num_frames``            INT64                real (not padded) frames the tokens were made from
``content_hash``          VARCHAR(128)         sha256 of the file bytes; idempotent re-ingest
``video_id``              VARCHAR(512)         the video the segment belongs to (scalar index)
``segment``               INT64                which segment (0-based, in time order)
``start_s``, ``end_s``    FLOAT                the segment's span in the video, seconds
(dynamic fields)          JSON ``$meta``       any user metadata given at ingest
========================  ===================  ===============================================

Schema versions. ``SCHEMA_VERSION`` 2 (segments) has the four segment fields
(:data:`SEGMENT_FIELDS`) in the schema and a scalar index on ``video_id`` (``INVERTED`` where the
engine has it, else ``Trie``, else none: Milvus 2.3 has no INVERTED). Collections of version 1
(one row per video, made before segments) stay supported without migration: rows written to
them carry the four as dynamic fields, and a row written before segments (no ``video_id``)
reads as segment 0 of the video of its id, ``[0, duration_s]``
(:func:`tb_reranker.index.entities.flatten`).

Model fingerprint. **Choice:** the *vision fingerprint* of the model whose vectors fill the
collection (``TokenBinder.vision_fingerprint()``: vision tower, frame sampling, normalisation;
what the vectors and frame tokens depend on) is a *collection property*
``tb.vision_fingerprint`` (plus ``tb.dim`` and ``tb.schema_version``), set at creation and updated
by :func:`set_fingerprint`. Any checkpoint with that vision side serves the collection, whatever
its text tower, indicators or fusion. It is also written into the schema description (JSON
``{"app": "tb_reranker", "schema_version", "dim", "fingerprint", "vision_fingerprint"}``). The
property is the source of truth; the description is the fallback for engines that drop
properties (Milvus Lite 2.5 keeps descriptions but not properties; Milvus Lite 3.x keeps
properties but not descriptions; the 2.3 server keeps both). A per-row field was rejected: it
costs 64 bytes a row and one collection holds one vision model's vectors by construction.

Collections written before the split carry only ``tb.fingerprint``, the *whole-model*
fingerprint: :func:`collection_identity` reports them as ``legacy``; only that exact model is
accepted until ``tb migrate --checkpoint <the checkpoint that filled it>`` verifies it and records
its vision fingerprint. New collections write the vision fingerprint into ``tb.fingerprint`` too,
so a tb_reranker from before the split (comparing whole-model fingerprints) refuses them.

Index. ``cls`` uses metric COSINE and HNSW with ``M=16``, ``efConstruction=200`` (search ``ef``
defaults to 64 and is a search parameter, ``ef >= limit``). Milvus Lite 2.5.x accepts only
FLAT/IVF_FLAT/AUTOINDEX; there :func:`create_collection` falls back to AUTOINDEX (the engine
picks). Milvus Lite 3.x and the 2.3 server both accept HNSW.

Consistency: the collection is created with ``Bounded`` consistency (fast searches on a server);
tests and the index's read-after-write paths pass ``consistency_level="Strong"`` per call.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

__all__ = [
    "SCHEMA_VERSION",
    "FINGERPRINT_PROPERTY",
    "VISION_FINGERPRINT_PROPERTY",
    "DIM_PROPERTY",
    "SCHEMA_VERSION_PROPERTY",
    "ID_MAX_LENGTH",
    "URI_MAX_LENGTH",
    "HASH_MAX_LENGTH",
    "SCALAR_FIELDS",
    "SEGMENT_FIELDS",
    "SUPPORTED_SCHEMA_VERSIONS",
    "IndexConfig",
    "build_schema",
    "build_index_params",
    "create_collection",
    "describe_collection",
    "drop_collection",
    "check_collection",
    "collection_fingerprint",
    "collection_identity",
    "StoredIdentity",
    "set_fingerprint",
    "is_lite_uri",
]

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2  # bump when fields change; 2 = one row per segment (the segment fields)
SUPPORTED_SCHEMA_VERSIONS = (1, 2)  # what check_collection accepts (1: segment fields dynamic)
FINGERPRINT_PROPERTY = "tb.fingerprint"  # whole-model fingerprint (before the split); now = vision
VISION_FINGERPRINT_PROPERTY = "tb.vision_fingerprint"  # the vision fingerprint of the vectors
DIM_PROPERTY = "tb.dim"  # collection property holding D (also in the vector field)
SCHEMA_VERSION_PROPERTY = "tb.schema_version"  # collection property holding SCHEMA_VERSION
ID_MAX_LENGTH = 512  # max bytes of a video id (the store accepts at most 255 characters)
URI_MAX_LENGTH = 4096  # max bytes of a video uri
HASH_MAX_LENGTH = 128  # "sha256:<64 hex>" fits with room
VECTOR_FIELD = "cls"
PRIMARY_FIELD = "id"
# scalar fields returned with every hit (vector excluded: it is D floats per hit)
SCALAR_FIELDS = ("uri", "duration_s", "num_frames", "content_hash")
# where a row's segment lies: real fields from schema 2 on, dynamic ones in a schema-1 collection
SEGMENT_FIELDS = ("video_id", "segment", "start_s", "end_s")
# scalar index types tried on video_id, in order (Milvus Lite 3.x: INVERTED; 2.3 server: Trie)
VIDEO_ID_INDEX_TYPES = ("INVERTED", "Trie")


@dataclass(frozen=True)
class IndexConfig:
    """Vector index of the ``cls`` field."""

    index_type: str = "HNSW"  # HNSW where supported; AUTOINDEX fallback (Milvus Lite 2.5)
    metric_type: str = "COSINE"  # scores are cosine similarities in [-1, 1]
    m: int = 16  # HNSW graph degree
    ef_construction: int = 200  # HNSW build-time candidate list
    ef: int = 64  # HNSW search-time candidate list (raised to limit when smaller)

    def index_params(self) -> dict[str, Any]:
        if self.index_type == "HNSW":
            return {"M": self.m, "efConstruction": self.ef_construction}
        return {}

    def search_params(self, limit: int) -> dict[str, Any]:
        params: dict[str, Any] = {"metric_type": self.metric_type}
        if self.index_type == "HNSW":
            params["params"] = {"ef": max(self.ef, limit)}
        return params


def is_lite_uri(uri: str) -> bool:
    """A Milvus Lite URI is a local file path (``./x.db``, ``/abs/x.db``), not ``http(s)://``/``tcp://``."""
    return "://" not in uri or uri.startswith("file://")


def _description(dim: int, fingerprint: str, version: int) -> str:
    return json.dumps(
        {
            "app": "tb_reranker",
            "schema_version": version,
            "dim": dim,
            "fingerprint": fingerprint,
            "vision_fingerprint": fingerprint,
        }
    )


def build_schema(dim: int, fingerprint: str = "", version: int = SCHEMA_VERSION) -> Any:
    """The collection schema for ``dim``-dimensional segment vectors (a
    ``pymilvus.CollectionSchema``); ``version`` 1 is the schema before segments (for tests of
    collections made then)."""
    from pymilvus import DataType, MilvusClient

    if version not in SUPPORTED_SCHEMA_VERSIONS:
        raise ValueError(f"schema version {version}: this code writes {SUPPORTED_SCHEMA_VERSIONS}")
    schema = MilvusClient.create_schema(
        auto_id=False,
        enable_dynamic_field=True,
        description=_description(dim, fingerprint, version),
    )
    schema.add_field(PRIMARY_FIELD, DataType.VARCHAR, is_primary=True, max_length=ID_MAX_LENGTH)
    schema.add_field(VECTOR_FIELD, DataType.FLOAT_VECTOR, dim=dim)
    schema.add_field("uri", DataType.VARCHAR, max_length=URI_MAX_LENGTH)
    schema.add_field("duration_s", DataType.FLOAT)
    schema.add_field("num_frames", DataType.INT64)
    schema.add_field("content_hash", DataType.VARCHAR, max_length=HASH_MAX_LENGTH)
    if version >= 2:
        schema.add_field("video_id", DataType.VARCHAR, max_length=ID_MAX_LENGTH)
        schema.add_field("segment", DataType.INT64)
        schema.add_field("start_s", DataType.FLOAT)
        schema.add_field("end_s", DataType.FLOAT)
    return schema


def build_index_params(client: Any, config: IndexConfig, video_id_index: str | None = None) -> Any:
    """The vector index of ``config``, plus a ``video_id_index`` scalar index on ``video_id``
    (None: no scalar index)."""
    params = client.prepare_index_params()
    params.add_index(
        field_name=VECTOR_FIELD,
        index_type=config.index_type,
        metric_type=config.metric_type,
        params=config.index_params(),
    )
    if video_id_index:
        params.add_index(field_name="video_id", index_type=video_id_index)
    return params


def _properties(dim: int, fingerprint: str, version: int) -> dict[str, str]:
    return {
        FINGERPRINT_PROPERTY: fingerprint,
        VISION_FINGERPRINT_PROPERTY: fingerprint,
        DIM_PROPERTY: str(dim),
        SCHEMA_VERSION_PROPERTY: str(version),
    }


def create_collection(
    client: Any,
    name: str,
    dim: int,
    *,
    fingerprint: str = "",
    index: IndexConfig | None = None,
    timeout: float | None = None,
    version: int = SCHEMA_VERSION,
) -> IndexConfig:
    """Create collection ``name`` with its index, and load it. Returns the index actually built.

    ``fingerprint`` is the vision fingerprint of the model that will fill it ("" = unmarked).
    ``client`` is a ``pymilvus.MilvusClient``. Raises pymilvus errors unchanged (callers map them).
    HNSW is tried first; an engine that refuses it (Milvus Lite 2.5) gets AUTOINDEX. The scalar
    index on ``video_id`` takes the first of :data:`VIDEO_ID_INDEX_TYPES` the engine builds, or
    none. ``version`` 1 makes a collection as before segments (tests of old collections).
    """
    from pymilvus.exceptions import MilvusException

    index = index or IndexConfig()
    schema = build_schema(dim, fingerprint, version)
    scalar_choices: list[str | None] = [*VIDEO_ID_INDEX_TYPES, None] if version >= 2 else [None]

    def create(config: IndexConfig) -> None:
        for scalar in scalar_choices:
            try:
                client.create_collection(
                    name,
                    schema=schema,
                    index_params=build_index_params(client, config, scalar),
                    consistency_level="Bounded",
                    properties=_properties(dim, fingerprint, version),
                    timeout=timeout,
                )
                return
            except MilvusException as exc:
                if scalar is None or "index" not in str(exc).lower():
                    raise
                log.info("this Milvus refuses a %s index on video_id (%s)", scalar, exc)
                if client.has_collection(name, timeout=timeout):
                    client.drop_collection(name, timeout=timeout)

    try:
        create(index)
    except MilvusException as exc:
        if index.index_type != "HNSW" or "index type" not in str(exc).lower():
            raise
        log.info("this Milvus refuses HNSW (%s); using AUTOINDEX", exc)
        if client.has_collection(name, timeout=timeout):
            client.drop_collection(name, timeout=timeout)
        index = IndexConfig(index_type="AUTOINDEX", metric_type=index.metric_type, ef=index.ef)
        create(index)
    client.load_collection(name, timeout=timeout)
    log.info("created collection %s (dim %d, %s)", name, dim, index.index_type)
    return index


def _description_meta(description: dict[str, Any]) -> dict[str, Any]:
    """The JSON written into the schema description at creation ({} when absent/foreign)."""
    try:
        meta = json.loads(description.get("description") or "")
    except ValueError:
        return {}
    return meta if isinstance(meta, dict) and meta.get("app") == "tb_reranker" else {}


def collection_fingerprint(description: dict[str, Any]) -> str | None:
    """The fingerprint recorded on a collection (from ``describe_collection``), or None: the
    vision fingerprint, or for a collection written before the split its whole-model one (see
    :func:`collection_identity` to tell them apart)."""
    return collection_identity(description).value


@dataclass(frozen=True)
class StoredIdentity:
    """Which model filled a collection: ``kind`` is ``"vision"`` (a vision fingerprint),
    ``"legacy"`` (a whole-model fingerprint, written before the identity was split: ``tb
    migrate`` turns it into a vision one) or ``"none"`` (unmarked)."""

    kind: str
    value: str | None

    @property
    def legacy(self) -> bool:
        return self.kind == "legacy"


def collection_identity(description: dict[str, Any]) -> StoredIdentity:
    """The :class:`StoredIdentity` recorded on a collection (from ``describe_collection``).

    The collection properties win (they are updated by :func:`set_fingerprint`); engines that
    drop properties (Milvus Lite 2.5) fall back to the creation-time description.
    """
    props = description.get("properties") or {}
    meta = _description_meta(description)
    if VISION_FINGERPRINT_PROPERTY in props or (
        FINGERPRINT_PROPERTY not in props and "vision_fingerprint" in meta
    ):
        value = str(props.get(VISION_FINGERPRINT_PROPERTY, meta.get("vision_fingerprint", "")))
        return StoredIdentity("vision", value) if value else StoredIdentity("none", None)
    legacy = props.get(FINGERPRINT_PROPERTY, meta.get("fingerprint"))
    if legacy:
        return StoredIdentity("legacy", str(legacy))
    return StoredIdentity("none", None)


def set_fingerprint(
    client: Any, name: str, fingerprint: str, *, timeout: float | None = None
) -> None:
    """Record the vision ``fingerprint`` on an existing collection (e.g. one created before a
    model existed, or a migrated one). The legacy key gets the same value, so a tb_reranker from
    before the split refuses the collection rather than trusting it."""
    client.alter_collection_properties(
        name,
        properties={FINGERPRINT_PROPERTY: fingerprint, VISION_FINGERPRINT_PROPERTY: fingerprint},
        timeout=timeout,
    )


def describe_collection(client: Any, name: str, *, timeout: float | None = None) -> dict[str, Any]:
    """A JSON-friendly summary: fields, dim, index, fingerprint, row count, load state."""
    desc = client.describe_collection(name, timeout=timeout)
    fields = []
    dim = None
    for field in desc.get("fields", []):
        params = dict(field.get("params") or {})
        ftype = field.get("type")
        entry = {
            "name": field.get("name"),
            "type": getattr(ftype, "name", str(ftype)),
            "params": {k: (int(v) if str(v).isdigit() else v) for k, v in params.items()},
        }
        if field.get("is_primary"):
            entry["primary"] = True
        if field.get("name") == VECTOR_FIELD and "dim" in params:
            dim = int(params["dim"])
        fields.append(entry)
    indexes = {}
    for index_name in client.list_indexes(name, timeout=timeout):
        info = client.describe_index(name, index_name, timeout=timeout) or {}
        indexes[index_name] = {k: v for k, v in info.items() if isinstance(v, (str, int, float))}
    stats = client.get_collection_stats(name, timeout=timeout)
    load = client.get_load_state(name, timeout=timeout)
    props = {k: str(v) for k, v in (desc.get("properties") or {}).items()}
    return {
        "name": name,
        "dim": dim,
        "fingerprint": collection_fingerprint(desc),
        "fingerprint_kind": collection_identity(desc).kind,
        "schema_version": int(
            props.get(SCHEMA_VERSION_PROPERTY) or _description_meta(desc).get("schema_version") or 0
        ),
        "fields": fields,
        "dynamic_fields": bool(desc.get("enable_dynamic_field")),
        "indexes": indexes,
        "properties": props,
        "row_count": int(stats.get("row_count", 0)),
        "load_state": getattr(load.get("state"), "name", str(load.get("state"))),
        "consistency_level": desc.get("consistency_level_name", desc.get("consistency_level")),
    }


def drop_collection(client: Any, name: str, *, timeout: float | None = None) -> bool:
    """Drop collection ``name``; False when it did not exist."""
    if not client.has_collection(name, timeout=timeout):
        return False
    client.drop_collection(name, timeout=timeout)
    log.info("dropped collection %s", name)
    return True


def check_collection(
    client: Any,
    name: str,
    *,
    dim: int | None = None,
    fingerprint: str | None = None,
    timeout: float | None = None,
) -> list[str]:
    """Compare an existing collection against this schema. Returns problems (empty list = OK)."""
    info = describe_collection(client, name, timeout=timeout)
    problems: list[str] = []
    by_name = {f["name"]: f for f in info["fields"]}
    expected = {
        PRIMARY_FIELD: "VARCHAR",
        VECTOR_FIELD: "FLOAT_VECTOR",
        "uri": "VARCHAR",
        "duration_s": "FLOAT",
        "num_frames": "INT64",
        "content_hash": "VARCHAR",
    }
    if info["schema_version"] >= 2:  # version 1 keeps the segment fields as dynamic ones
        expected.update(video_id="VARCHAR", segment="INT64", start_s="FLOAT", end_s="FLOAT")
    for field_name, type_name in expected.items():
        got = by_name.get(field_name)
        if got is None:
            problems.append(f"missing field {field_name!r}")
        elif got["type"] != type_name:
            problems.append(f"field {field_name!r} is {got['type']}, expected {type_name}")
    if PRIMARY_FIELD in by_name and not by_name[PRIMARY_FIELD].get("primary"):
        problems.append(f"field {PRIMARY_FIELD!r} is not the primary key")
    if not info["dynamic_fields"]:
        problems.append("dynamic fields are disabled (user metadata cannot be stored)")
    if dim is not None and info["dim"] != dim:
        problems.append(f"vector dim is {info['dim']}, expected {dim}")
    vector_index = info["indexes"].get(VECTOR_FIELD)
    if vector_index is None:
        problems.append(f"no index on {VECTOR_FIELD!r}")
    elif str(vector_index.get("metric_type", "COSINE")).upper() != "COSINE":
        problems.append(f"index metric is {vector_index.get('metric_type')}, expected COSINE")
    if info["schema_version"] not in SUPPORTED_SCHEMA_VERSIONS:
        problems.append(
            f"schema version {info['schema_version']}, expected one of "
            f"{', '.join(map(str, SUPPORTED_SCHEMA_VERSIONS))}"
        )
    if info["fingerprint_kind"] == "legacy":
        problems.append(
            f"the collection records the whole-model fingerprint {info['fingerprint']!r} "
            "(written before vision fingerprints): run `tb migrate --checkpoint <the checkpoint "
            "that filled it>`"
        )
    elif fingerprint is not None and info["fingerprint"] != fingerprint:
        problems.append(
            f"vision fingerprint is {info['fingerprint']!r}, expected {fingerprint!r} "
            "(vectors were made by another vision model)"
        )
    return problems
