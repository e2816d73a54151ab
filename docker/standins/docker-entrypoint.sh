#!/bin/sh
# Entrypoint of the S3 stand-in, as the official MinIO image's: `server /data` (a bare minio
# subcommand) runs `minio server /data`; any other command (minio, mc, sh, ...) runs as it is.
set -e
if [ $# -eq 0 ] || ! command -v "$1" >/dev/null 2>&1; then
    set -- minio "$@"
fi
exec "$@"
