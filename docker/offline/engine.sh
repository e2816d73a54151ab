#!/usr/bin/env bash
# A Docker engine for the docker tests: `engine.sh start` / `engine.sh stop`.
#
# start: nothing to do when an engine already answers. Otherwise installs Debian's docker.io (and
#        debootstrap, which build-images.sh needs) when missing, starts `dockerd --iptables=false
#        --bridge=none` (what works on our machines: measured at the project's start), waits until it
#        answers, and records its pid in build/docker/dockerd.pid.
# stop:  stops only the engine that `start` started (by the recorded pid), never another one.
# Exit status: 0 when an engine answers (start) or was stopped (stop); 1 with one line of reason.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
STATE=${TB_DOCKER_BUILD_DIR:-$ROOT/build/docker}
PIDFILE=$STATE/dockerd.pid
log() { printf '[engine] %s\n' "$*" >&2; }

answers() { docker info >/dev/null 2>&1; }

start() {
    if command -v docker >/dev/null && answers; then
        log "a Docker engine already answers; using it"
        return 0
    fi
    if ! command -v dockerd >/dev/null || ! command -v debootstrap >/dev/null; then
        [ "$(id -u)" = 0 ] || { log "no dockerd and not root: install docker.io and debootstrap first"; return 1; }
        log "installing Debian's docker.io and debootstrap"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -q >/dev/null && apt-get install -y -q docker.io debootstrap >/dev/null \
            || { log "apt-get install docker.io debootstrap failed"; return 1; }
    fi
    [ "$(id -u)" = 0 ] || { log "dockerd needs root"; return 1; }
    mkdir -p "$STATE"
    log "starting dockerd --iptables=false --bridge=none (log: ${STATE#"$ROOT"/}/dockerd.log)"
    setsid dockerd --iptables=false --bridge=none >"$STATE/dockerd.log" 2>&1 </dev/null &
    echo $! >"$PIDFILE"
    for _ in $(seq 60); do
        if answers; then log "engine ready"; return 0; fi
        kill -0 "$(cat "$PIDFILE")" 2>/dev/null || break
        sleep 1
    done
    log "dockerd did not answer within 60 s: $(tail -1 "$STATE/dockerd.log" 2>/dev/null)"
    stop || true
    return 1
}

stop() {
    [ -f "$PIDFILE" ] || { log "no engine of ours to stop"; return 0; }
    local pid
    pid=$(cat "$PIDFILE")
    if kill -0 "$pid" 2>/dev/null; then
        log "stopping the dockerd we started (pid $pid)"
        kill -TERM "$pid"
        for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
        kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
    fi
    rm -f "$PIDFILE"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    *) echo "usage: engine.sh start|stop" >&2; exit 2 ;;
esac
