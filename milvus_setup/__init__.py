"""Deployment tool: Milvus admin commands and a local-server launcher.

``python -m milvus_setup create|describe|drop|check --uri URI [--token T] [--collection C]``
(the schema they apply lives in the library, :mod:`tb_reranker.index.schema`);
``milvus_setup.launcher.LocalMilvus`` starts a real Milvus 2.3.5 server on free ports.
Nothing is imported eagerly.
"""

from __future__ import annotations

__all__ = ["launcher", "cli"]
