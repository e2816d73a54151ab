#!/usr/bin/env bash
# `make test-docker`: an engine (started if none answers), the images built offline, the docker
# tests against them, and everything torn down, volumes included, even when a test fails.
# Under CI=true an engine that cannot be started fails the run; elsewhere the tests are skipped
# with the reason.
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"
PY=${PYTHON:-$ROOT/.venv/bin/python}
case "$PY" in /*) ;; */*) PY=$PWD/$PY ;; esac  # the scripts change directory
ci() { case "${CI:-}" in 1|true|TRUE|yes) return 0 ;; esac; return 1; }

if ! bash docker/offline/engine.sh start; then
    if ci; then echo "test-docker: no Docker engine could be started (CI=true: failing)" >&2; exit 1; fi
    echo "test-docker: no Docker engine could be started; the docker tests are skipped" >&2
    exec "$PY" -m pytest -q -rs tests/docker
fi
trap 'bash docker/offline/engine.sh stop' EXIT

bash docker/offline/build-images.sh || exit 1
TB_REQUIRE_DOCKER=1 TESTCONTAINERS_RYUK_DISABLED=true "$PY" -m pytest -q -rs tests/docker "$@"
