"""Which model a collection belongs to: the binding of a ``VideoIndex`` to a model and the
collection properties that record the model that filled it.

:class:`ModelBinding` holds the bound model's vision fingerprint, whole-model fingerprint and
vector dimension (read-only, set at construction or by :meth:`ModelBinding.bind`), reads what the
collection records (:func:`tb_reranker.index.schema.collection_identity`: vision, legacy or
none) and decides whether the model may use it:

- a vision fingerprint: only the same vision side;
- a legacy (whole-model) fingerprint, written before the identity was split: only that very
  model, until ``tb migrate`` records its vision fingerprint;
- none recorded, or no fingerprint bound: accepted.

A refusal is :class:`ModelMismatchError` naming the re-index / migrate commands, or, while
mismatches are tolerated, a warning.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import numpy as np

from tb_reranker.errors import InvalidInputError, ModelMismatchError
from tb_reranker.index import schema as milvus_schema
from tb_reranker.index.connection import MilvusConnection

__all__ = [
    "ModelBinding",
    "description",
    "fingerprint_text",
    "positive_dim",
    "record_fingerprint",
    "stored_identity",
    "vector_dim",
]

log = logging.getLogger(__name__)

_REINDEX = (
    "re-index the videos with this checkpoint into a new collection and store: `tb ingest "
    "VIDEOS --checkpoint CHECKPOINT --collection NEW_NAME --store NEW_DIR` (or drop this "
    "one first: `tb collection drop --yes`)"
)


def positive_dim(dim: Any) -> int:
    if isinstance(dim, bool) or not isinstance(dim, int | np.integer) or dim <= 0:
        raise InvalidInputError(f"dim must be a positive int, got {dim!r}")
    return int(dim)


def fingerprint_text(fingerprint: Any) -> str:
    if not isinstance(fingerprint, str):
        raise InvalidInputError(f"fingerprint must be a string, got {type(fingerprint).__name__}")
    return fingerprint


def vector_dim(description: dict[str, Any]) -> int | None:
    """D of the ``cls`` field of a ``describe_collection`` answer (None when absent)."""
    dim = None
    for field in description.get("fields", []):
        if field.get("name") == "cls":
            dim = int(field["params"]["dim"])
    return dim


def description(connection: MilvusConnection) -> dict[str, Any]:
    """pymilvus's ``describe_collection`` answer (fields, properties, description)."""
    return connection.call("describe", connection.client.describe_collection, connection.collection)


def stored_identity(connection: MilvusConnection) -> milvus_schema.StoredIdentity:
    """What the collection records about the model that filled it."""
    return milvus_schema.collection_identity(description(connection))


def record_fingerprint(connection: MilvusConnection, fingerprint: str) -> None:
    """Record the vision ``fingerprint`` on the collection (its properties and description)."""
    connection.call(
        "alter_collection_properties",
        milvus_schema.set_fingerprint,
        connection.client,
        connection.collection,
        fingerprint,
    )


class ModelBinding:
    """The model bound to one collection, and the check of that collection against it.

    Args:
        collection: the collection's name (in messages).
        dim: vector dimension D (None: adopted from the collection).
        fingerprint: vision fingerprint of the model (None: do not check the collection's).
        model_fingerprint: that model's whole-model fingerprint (accepted on a legacy
            collection).
        allow_mismatch: warn instead of raising on a fingerprint mismatch.
    """

    def __init__(
        self,
        collection: str,
        *,
        dim: int | None = None,
        fingerprint: str | None = None,
        model_fingerprint: str | None = None,
        allow_mismatch: bool = False,
    ) -> None:
        self.collection = collection
        self.dim = None if dim is None else positive_dim(dim)
        self.fingerprint = None if fingerprint is None else fingerprint_text(fingerprint)
        self.model_fingerprint = (
            None if model_fingerprint is None else fingerprint_text(model_fingerprint)
        )
        self.allow_mismatch = allow_mismatch

    def bind(
        self,
        *,
        fingerprint: str | None = None,
        dim: int | None = None,
        model_fingerprint: str | None = None,
    ) -> None:
        """Adopt ``fingerprint``, ``dim`` and ``model_fingerprint`` where none is set;
        ``ModelMismatchError`` (and no change) when another one is."""
        dim = None if dim is None else positive_dim(dim)
        fingerprint = None if fingerprint is None else fingerprint_text(fingerprint)
        if fingerprint is not None and self.fingerprint not in (None, fingerprint):
            raise ModelMismatchError(
                f"the index expects model {self.fingerprint} but the model given is {fingerprint}"
            )
        if dim is not None and self.dim not in (None, dim):
            raise ModelMismatchError(
                f"the index holds {self.dim}-d vectors, the model makes {dim}-d ones"
            )
        if fingerprint is not None:
            self.fingerprint = fingerprint
            if model_fingerprint is not None:
                self.model_fingerprint = fingerprint_text(model_fingerprint)
        if dim is not None:
            self.dim = dim

    @contextlib.contextmanager
    def tolerating(self, tolerate: bool = True) -> Iterator[None]:
        """Within the block (when ``tolerate``) a mismatch is logged, not raised."""
        allowed = self.allow_mismatch
        self.allow_mismatch = allowed or tolerate
        try:
            yield
        finally:
            self.allow_mismatch = allowed

    def accepts(self, stored: milvus_schema.StoredIdentity) -> bool:
        """Whether the bound model may read/write a collection recording ``stored``."""
        if self.fingerprint is None or stored.value is None:
            return True
        if stored.legacy:  # a whole-model fingerprint: only that very model
            return stored.value in (self.model_fingerprint, self.fingerprint)
        return stored.value == self.fingerprint

    def mismatch_message(self, stored: milvus_schema.StoredIdentity) -> str:
        """Why the bound model may not use a collection recording ``stored``, and what to run."""
        collection = self.collection
        if stored.legacy:
            return (
                f"collection {collection!r} was filled before vision fingerprints existed "
                f"and records model {stored.value}, not the loaded model "
                f"{self.model_fingerprint or self.fingerprint}. If you have the checkpoint that "
                "filled it, run `tb migrate --checkpoint THAT_CHECKPOINT` once (it verifies that "
                "checkpoint, records its vision fingerprint and re-encodes nothing); then every "
                f"checkpoint with the same vision side serves it. Otherwise {_REINDEX}"
            )
        return (
            f"collection {collection!r} holds vectors of vision model {stored.value} but "
            f"the loaded checkpoint's vision side is {self.fingerprint} (its vision tower, frame "
            "sampling or normalisation differ; a checkpoint trained with --freeze-backbone from "
            f"the one that filled it would match); search results would be meaningless. Serve "
            f"a checkpoint with that vision side, or {_REINDEX}"
        )

    def check(self, description: dict[str, Any]) -> bool:
        """Raise on a dim/fingerprint mismatch with the collection ``description`` (adopting its
        dim when none is bound); True when a fingerprint mismatch was tolerated."""
        dim = vector_dim(description)
        if self.dim is None:
            self.dim = dim
        elif dim is not None and dim != self.dim:
            raise ModelMismatchError(
                f"collection {self.collection!r} holds {dim}-d vectors but the "
                f"model makes {self.dim}-d ones; use another collection or re-create it"
            )
        stored = milvus_schema.collection_identity(description)
        if not self.accepts(stored):
            message = self.mismatch_message(stored)
            if not self.allow_mismatch:
                raise ModelMismatchError(message)
            log.warning("%s (allowed)", message)
            return True
        return False
