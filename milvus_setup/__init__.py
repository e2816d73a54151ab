"""Milvus collection schema, index definition, admin commands and a local-server launcher.

``python -m milvus_setup create|describe|drop|check --uri URI [--token T] [--collection C]``;
``milvus_setup.schema`` holds the schema, ``milvus_setup.launcher.LocalMilvus`` starts a real
Milvus 2.3.5 server on free ports. Nothing is imported eagerly.
"""

from __future__ import annotations

__all__ = ["schema", "launcher", "cli"]
