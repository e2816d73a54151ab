"""Container health probe: one ``grpc.health.v1.Health/Check`` against the local sidecar.

Exit 0 when the server answers SERVING, 1 otherwise (Docker's HEALTHCHECK contract). Reads the
same variables as ``tb serve``: ``TB_SERVE_PORT`` (default 50051) and, when the server uses TLS,
``TB_SERVE_TLS_CERT`` as the trusted root (right for a self-signed certificate). Optional:
``TB_HEALTHCHECK_SERVICE`` (service name to check, default "" = the whole server),
``TB_HEALTHCHECK_CA`` (CA bundle instead of the server certificate),
``TB_HEALTHCHECK_CERT`` / ``TB_HEALTHCHECK_KEY`` (client certificate when mTLS is on),
``TB_HEALTHCHECK_TLS_NAME`` (name the certificate is checked against, default "localhost").
Health calls are exempt from the bearer token, so no token is needed.
"""

from __future__ import annotations

import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

DEFAULT_PORT = 50051  # tb serve's default gRPC port (tb_reranker.server.config.ServerConfig.port)


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _channel(target: str) -> grpc.Channel:
    server_cert = os.environ.get("TB_SERVE_TLS_CERT", "")
    if not server_cert:
        return grpc.insecure_channel(target)
    root = _read(os.environ.get("TB_HEALTHCHECK_CA") or server_cert)
    client_cert = os.environ.get("TB_HEALTHCHECK_CERT", "")
    client_key = os.environ.get("TB_HEALTHCHECK_KEY", "")
    credentials = grpc.ssl_channel_credentials(
        root_certificates=root,
        private_key=_read(client_key) if client_key else None,
        certificate_chain=_read(client_cert) if client_cert else None,
    )
    name = os.environ.get("TB_HEALTHCHECK_TLS_NAME", "localhost")
    return grpc.secure_channel(
        target, credentials, options=[("grpc.ssl_target_name_override", name)]
    )


def main() -> int:
    port = int(os.environ.get("TB_SERVE_PORT") or DEFAULT_PORT)
    service = os.environ.get("TB_HEALTHCHECK_SERVICE", "")
    try:
        with _channel(f"127.0.0.1:{port}") as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=4.0
            )
    except (grpc.RpcError, OSError) as exc:
        print(f"unhealthy: {exc}", file=sys.stderr)
        return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(status)
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main())
