"""The wire: what the gRPC server and the remote SDK share, so both ends agree on one encoding.

| module | concern |
|---|---|
| ``convert`` | numpy / result dataclasses / request objects ↔ ``tb_reranker.v1`` messages |
| ``status`` | ``TBError`` type ↔ gRPC status (and HTTP status) tables, the ``tb-error-type`` trailer |

``pb`` and ``pb_grpc`` are the generated stubs (``tb_reranker/_pb``, ``make proto``). The
server (``tb_reranker.server``) and the SDK (``tb_reranker.remote``) import this package; it
imports neither.
"""

from __future__ import annotations

from tb_reranker._pb.tb_reranker.v1 import reranker_pb2 as pb
from tb_reranker._pb.tb_reranker.v1 import reranker_pb2_grpc as pb_grpc

__all__ = ["pb", "pb_grpc"]
