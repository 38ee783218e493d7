#!/usr/bin/env bash
# Idempotent: make a Docker engine answer on buildq's own socket and build the test image
# buildq/buildctl-standin:test (busybox-static + the sh buildctl stand-in + a few captures).
#
#   bash .ci/dockerd.sh            # install (if needed), start (if needed), build image (if changed)
#   export "$(bash .ci/dockerd.sh | tail -n1)"   # last stdout line is DOCKER_HOST=unix://...
#
# Everything it does is printed. Safe to call from tests and from .ci/run, as root.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RUN_DIR=/run/buildq-dockerd
SOCK="$RUN_DIR/docker.sock"
HOST_URL="unix://$SOCK"
DATA_ROOT=/var/lib/buildq-dockerd
EXEC_ROOT="$RUN_DIR/exec"
PIDFILE="$RUN_DIR/dockerd.pid"
LOG=/var/log/buildq-dockerd.log
IMAGE=buildq/buildctl-standin:test
HASH_LABEL=buildq.standin.hash
START_TIMEOUT_S=60

say() { echo "dockerd.sh: $*"; }

# A terminal's size is no business of the engine: dockerd runs its host's ps for `docker top`, and
# ps cuts command lines to the width in COLUMNS (Python's readline exports COLUMNS=80 LINES=24 to
# every child of a process that imported it, pytest's among them).
unset COLUMNS LINES

docker_cli() { DOCKER_HOST="$HOST_URL" docker "$@"; }

answers() { docker_cli info >/dev/null 2>&1; }

install_engine() {
    if command -v dockerd >/dev/null 2>&1 && command -v docker >/dev/null 2>&1 \
        && command -v busybox >/dev/null 2>&1; then
        return
    fi
    local t0=$SECONDS
    say "installing docker.io and busybox-static with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends -o DPkg::Lock::Timeout=300 docker.io busybox-static
    say "installed in $((SECONDS - t0)) s"
}

# proc_alive PID: a live (not zombie) process has this pid.
proc_alive() {
    [[ -n "$1" && -r "/proc/$1/stat" ]] && [[ "$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1)" != Z ]]
}

# dockerd_alive PID: ... and it is a dockerd (the pid file may be stale and the pid reused).
dockerd_alive() { proc_alive "$1" && [[ "$(cat "/proc/$1/comm" 2>/dev/null)" == dockerd ]]; }

start_engine() {
    if answers; then
        say "engine already answers on $HOST_URL"
        local running
        running="$(cat "$PIDFILE" 2>/dev/null || true)"
        if dockerd_alive "$running" && tr '\0' '\n' <"/proc/$running/environ" | grep -qE '^(COLUMNS|LINES)='; then
            say "note: dockerd pid $running was started with COLUMNS/LINES in its environment (buildq reads" \
                "docker top with whole lines anyway); restart it when nobody uses it to drop them"
        fi
        return
    fi
    local pid=
    [[ -f "$PIDFILE" ]] && pid="$(cat "$PIDFILE")"
    if dockerd_alive "$pid"; then
        say "dockerd pid $pid is running but does not answer yet; waiting"
    else
        rm -f "$PIDFILE" "$SOCK"
        # A killed engine may leave its containerd as a zombie for a while: dockerd would wait
        # for it ("containerd is still running") instead of starting a new one.
        local cpid_file="$EXEC_ROOT/containerd/containerd.pid"
        if [[ -f "$cpid_file" ]] && ! proc_alive "$(cat "$cpid_file")"; then
            rm -f "$cpid_file"
        fi
        mkdir -p "$RUN_DIR" "$DATA_ROOT" "$EXEC_ROOT" "$(dirname "$LOG")"
        [[ -f "$LOG" ]] && mv -f "$LOG" "$LOG.1"
        say "starting dockerd on $HOST_URL (data root $DATA_ROOT, log $LOG)"
        # setsid + nohup: the engine outlives the shell or test that started it.
        setsid nohup dockerd \
            --host "$HOST_URL" \
            --data-root "$DATA_ROOT" \
            --exec-root "$EXEC_ROOT" \
            --pidfile "$PIDFILE" \
            --iptables=false --ip-masq=false --bridge=none \
            >>"$LOG" 2>&1 </dev/null 9>&- &
        pid=$!
    fi
    local t0=$SECONDS
    until answers; do
        if ((SECONDS - t0 >= START_TIMEOUT_S)) || ! proc_alive "$pid"; then
            say "dockerd (pid $pid) did not come up within $((SECONDS - t0)) s; last lines of $LOG:"
            tail -n 40 "$LOG" >&2 || true
            exit 1
        fi
        sleep 0.2
    done
    say "engine answers after $((SECONDS - t0)) s"
}

# Content hash of everything that goes into the image (recipe included).
image_hash() {
    {
        sha256sum "$ROOT/tests/standin/buildctl.sh" "$(command -v busybox)"
        for f in "${CAPTURES[@]}"; do sha256sum "$ROOT/tests/fixtures/buildkit/$f"; done
        declare -f build_image | sha256sum
    } | sed 's#  .*/# #' | sha256sum | cut -c1-16
}

# The fixtures the sh stand-in needs, as it lists them on its "# image-captures:" line.
read -r -a CAPTURES <<<"$(sed -n 's/^# image-captures: //p' "$ROOT/tests/standin/buildctl.sh")"

build_image() {
    local hash=$1 tmp
    tmp="$(mktemp -d)"
    local rootfs="$tmp/rootfs"
    mkdir -p "$rootfs/bin" "$rootfs/usr/bin" "$rootfs/standin/captures" "$rootfs/tmp" "$rootfs/etc" \
        "$rootfs/proc" "$rootfs/sys" "$rootfs/dev"
    chmod 1777 "$rootfs/tmp"
    cp "$(command -v busybox)" "$rootfs/bin/busybox"
    local applet
    for applet in $(busybox --list); do
        [[ "$applet" == busybox ]] || ln -s busybox "$rootfs/bin/$applet"
    done
    install -m 0755 "$ROOT/tests/standin/buildctl.sh" "$rootfs/usr/bin/buildctl"
    local f
    for f in "${CAPTURES[@]}"; do cp "$ROOT/tests/fixtures/buildkit/$f" "$rootfs/standin/captures/"; done
    printf 'root:x:0:0:root:/root:/bin/sh\n' >"$rootfs/etc/passwd"
    printf 'root:x:0:\n' >"$rootfs/etc/group"
    tar -C "$rootfs" --owner=0 --group=0 --numeric-owner -cf - . |
        docker_cli import \
            --change "LABEL $HASH_LABEL=$hash" \
            --change 'ENV PATH=/usr/bin:/bin' \
            --change 'ENTRYPOINT ["/usr/bin/buildctl"]' \
            - "$IMAGE" >/dev/null
    rm -rf "$tmp"
}

ensure_image() {
    local want have
    want="$(image_hash)"
    have="$(docker_cli image inspect -f "{{ index .Config.Labels \"$HASH_LABEL\" }}" "$IMAGE" 2>/dev/null || true)"
    if [[ "$have" == "$want" ]]; then
        say "image $IMAGE is up to date ($HASH_LABEL=$want)"
        return
    fi
    say "building image $IMAGE ($HASH_LABEL=$want, was '${have:-missing}')"
    build_image "$want"
    docker_cli image prune -f --filter "label=$HASH_LABEL" >/dev/null 2>&1 || true
}

main() {
    if [[ $EUID -ne 0 ]]; then
        say "must run as root"
        exit 1
    fi
    # One run at a time (tests and .ci/run may call this concurrently).
    mkdir -p "$RUN_DIR"
    exec 9>"$RUN_DIR/dockerd.sh.lock"
    flock -w 600 9 || { say "another dockerd.sh holds $RUN_DIR/dockerd.sh.lock"; exit 1; }
    install_engine
    start_engine
    ensure_image
    echo "DOCKER_HOST=$HOST_URL"
}

main "$@"
