"""gRPC server reflection in both protocol versions: ``grpc.reflection.v1`` and ``v1alpha``.

grpcio-reflection (1.85) ships only the ``v1alpha`` servicer, while grpcurl, Postman and recent
gRPC tools ask ``grpc.reflection.v1.ServerReflection`` first. The v1 protocol
(``grpc/reflection/v1/reflection.proto``) has the same messages as v1alpha, field for field and
number for number, under another package name; their bytes on the wire are identical. So one
servicer answers both, registered under each service name with the v1alpha message classes.
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc
from grpc import aio
from grpc_reflection.v1alpha import reflection, reflection_pb2

__all__ = ["V1_SERVICE_NAME", "V1ALPHA_SERVICE_NAME", "enable_reflection"]

V1_SERVICE_NAME = "grpc.reflection.v1.ServerReflection"
V1ALPHA_SERVICE_NAME = reflection.SERVICE_NAME  # "grpc.reflection.v1alpha.ServerReflection"


def enable_reflection(service_names: Iterable[str], server: aio.Server) -> None:
    """Serve reflection of ``service_names`` (and of both reflection services) on ``server``."""
    names = [*service_names, V1_SERVICE_NAME, V1ALPHA_SERVICE_NAME]
    servicer = reflection.aio.ReflectionServicer(names)
    for service in (V1_SERVICE_NAME, V1ALPHA_SERVICE_NAME):
        handlers = {
            "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
                servicer.ServerReflectionInfo,
                request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
                response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
            )
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
