#!/usr/bin/env bash
# Sets up a real Docker engine for the docker_engine tests (issue 9), idempotently:
#   bash scripts/docker-engine.sh [start]   install (if dockerd is missing), start (unless an engine
#                                           already answers `docker info`), make the zl-busybox image
#   bash scripts/docker-engine.sh stop      stop the dockerd (and its containerd) that `start` started
#   bash scripts/docker-engine.sh status    exit 0 when an engine answers, 1 otherwise
#
# No registry is needed: the image is a busybox-static rootfs made here and `docker import`ed.
# Needs root. Exits non-zero with one clear line on stderr when no engine can be had.
#
# Environment: ZL_ENGINE_IMAGE (default zl-busybox), ZL_ENGINE_LOG (dockerd's log file),
# ZL_ENGINE_READY_S (how long to wait for a started dockerd to answer, default 60),
# ZL_ENGINE_STORAGE_DRIVER (tried first, default overlay2; vfs is the fallback).
set -euo pipefail

IMAGE=${ZL_ENGINE_IMAGE:-zl-busybox}
LOG=${ZL_ENGINE_LOG:-/var/log/zeroline-dockerd.log}
READY_S=${ZL_ENGINE_READY_S:-60}
DRIVER=${ZL_ENGINE_STORAGE_DRIVER:-overlay2}
PIDFILE=/var/run/docker.pid                       # dockerd writes its own pid here (not $!)
CONTAINERD_PIDFILE=/var/run/docker/containerd/containerd.pid
STATE=/var/run/zeroline-engine                    # what this script started, so stop kills only that
LOCK=/var/lock/zeroline-docker-engine.lock        # several sessions may run this at once

die() { echo "docker-engine.sh: $*" >&2; exit 1; }
now() { date +%s.%N; }
step_start=0
begin() { step_start=$(now); }
report() { awk -v a="$step_start" -v b="$(now)" -v s="$1" \
    'BEGIN { printf "docker-engine.sh: %-28s %6.2f s\n", s, b - a }'; }

engine_answers() { timeout 10 docker info >/dev/null 2>&1; }

# A child that exited stays a zombie until reaped, and kill -0 still succeeds on it.
pid_alive() {
    [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null \
        && [ "$(awk '{ print $3 }' "/proc/$1/stat" 2>/dev/null)" != Z ]
}

install_engine() {
    command -v apt-get >/dev/null || die "dockerd is missing and there is no apt-get to install it"
    begin
    # Only refresh the package lists when the candidate is unknown (update is the slow part).
    if ! apt-cache policy docker.io 2>/dev/null | grep -q 'Candidate: [0-9]'; then
        DEBIAN_FRONTEND=noninteractive apt-get update -qq || die "apt-get update failed"
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        docker.io busybox-static >/dev/null \
        || die "apt-get install docker.io busybox-static failed"
    report "install docker.io"
}

start_dockerd() {
    local driver=$1 pid waited=0
    mkdir -p "$(dirname "$LOG")" "$STATE"
    echo "== $(date -u +%FT%TZ) starting dockerd (storage driver $driver)" >>"$LOG"
    # No networking set-up: the tests need none, and iptables may not be usable here.
    # setsid: dockerd must not share the caller's process group (CI's Ctrl-C, job control).
    setsid dockerd --iptables=false --ip6tables=false --bridge=none \
        --storage-driver="$driver" --pidfile="$PIDFILE" >>"$LOG" 2>&1 </dev/null 9>&- &
    local launched=$!
    while ! engine_answers; do
        if ! pid_alive "$launched"; then
            return 1                                # exited: wrong storage driver, port in use...
        fi
        if [ "$waited" -ge "$READY_S" ]; then
            kill "$launched" 2>/dev/null || true
            die "dockerd did not answer within ${READY_S} s (see $LOG)"
        fi
        sleep 1
        waited=$((waited + 1))
    done
    pid=$(cat "$PIDFILE" 2>/dev/null || echo "$launched")
    echo "$pid" >"$STATE/dockerd.pid"
    # dockerd starts its own containerd when none runs; remember it so stop can wait for it too.
    if [ -s "$CONTAINERD_PIDFILE" ]; then
        cp "$CONTAINERD_PIDFILE" "$STATE/containerd.pid"
    fi
    return 0
}

make_image() {
    if docker image inspect "$IMAGE" >/dev/null 2>&1; then
        return 0
    fi
    local busybox dir
    busybox=$(command -v busybox || true)
    [ -x /bin/busybox ] && busybox=/bin/busybox
    # The image's only program must run without shared libraries.
    if [ -z "$busybox" ] || ldd "$busybox" >/dev/null 2>&1; then
        install_engine                              # brings busybox-static
        busybox=/bin/busybox
        if [ ! -x "$busybox" ] || ldd "$busybox" >/dev/null 2>&1; then
            die "no statically linked /bin/busybox to build the $IMAGE image"
        fi
    fi
    begin
    dir=$(mktemp -d /tmp/zl-busybox.XXXXXX)
    mkdir -p "$dir/bin" "$dir/tmp" "$dir/proc" "$dir/sys" "$dir/dev" "$dir/etc"
    chmod 1777 "$dir/tmp"
    cp "$busybox" "$dir/bin/busybox"
    chroot "$dir" /bin/busybox --install -s /bin
    if ! tar -C "$dir" -cf - . | docker import - "$IMAGE" >/dev/null; then
        rm -rf "$dir"
        die "docker import of $IMAGE failed"
    fi
    rm -rf "$dir"
    report "make image $IMAGE"
}

cmd_start() {
    local total
    total=$(now)
    [ "$(id -u)" = 0 ] || die "needs root (installs packages, starts dockerd)"
    if ! engine_answers; then
        if ! command -v dockerd >/dev/null; then
            install_engine
        fi
        command -v dockerd >/dev/null || die "dockerd is still missing after installing docker.io"
        if [ -s "$PIDFILE" ] && pid_alive "$(cat "$PIDFILE")"; then
            die "a dockerd (pid $(cat "$PIDFILE")) runs but does not answer docker info; see $LOG"
        fi
        begin
        if start_dockerd "$DRIVER"; then
            report "start dockerd ($DRIVER)"
        else
            echo "docker-engine.sh: dockerd exited with $DRIVER; trying vfs (see $LOG)" >&2
            begin
            start_dockerd vfs || die "dockerd exits at start with $DRIVER and vfs; see $LOG"
            report "start dockerd (vfs)"
        fi
    else
        echo "docker-engine.sh: an engine already answers docker info; reusing it"
    fi
    make_image
    step_start=$total
    report "engine ready (total)"
}

cmd_stop() {
    local pid cpid waited
    if [ ! -s "$STATE/dockerd.pid" ]; then
        echo "docker-engine.sh: no dockerd started by this script; nothing to stop"
        return 0
    fi
    pid=$(cat "$STATE/dockerd.pid")
    cpid=$(cat "$STATE/containerd.pid" 2>/dev/null || true)
    begin
    if pid_alive "$pid"; then
        kill -TERM "$pid"
        # dockerd stops its containers (up to their stop timeouts) before exiting.
        for waited in $(seq 1 60); do
            pid_alive "$pid" || break
            sleep 1
        done
        if pid_alive "$pid"; then
            echo "docker-engine.sh: dockerd $pid still runs after 60 s; killing it" >&2
            kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
    # The containerd dockerd launched normally exits with it; make sure.
    if pid_alive "$cpid" && [ "$(cat "/proc/$cpid/comm" 2>/dev/null)" = containerd ]; then
        kill -TERM "$cpid" 2>/dev/null || true
        for waited in $(seq 1 20); do
            pid_alive "$cpid" || break
            sleep 0.5
        done
        pid_alive "$cpid" && kill -KILL "$cpid" 2>/dev/null || true
    fi
    # dockerd bind-mounts its data root onto itself (to make its propagation shared) and does
    # not always undo it; leave no mount behind once no dockerd runs.
    if ! pgrep -x dockerd >/dev/null && mountpoint -q /var/lib/docker; then
        umount /var/lib/docker 2>/dev/null || echo "docker-engine.sh: cannot unmount /var/lib/docker" >&2
    fi
    rm -f "$STATE/dockerd.pid" "$STATE/containerd.pid"
    report "stop dockerd"
}

mkdir -p "$(dirname "$LOCK")"
exec 9>"$LOCK"
flock -w 300 9 || die "another docker-engine.sh held $LOCK for 300 s"

case "${1:-start}" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) engine_answers ;;
    *) die "usage: docker-engine.sh [start|stop|status]" ;;
esac
