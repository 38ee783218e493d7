#!/usr/bin/env bash
# A genuine BuildKit daemon and a plain-http registry for bench/launchers.py --genuine, each on its
# own port with its own state under DIR (default /tmp/buildq-bench-genuine). Run as root.
#
#   bash bench/genuine_env.sh start /path/to/buildkitd [BUILDKITD_PORT REGISTRY_PORT]
#   bash bench/genuine_env.sh stop
#
# `stop` ends only the two processes this script started (their pid files) and unmounts what a
# killed buildkitd left under its own root.
set -euo pipefail

DIR=${BENCH_GENUINE_DIR:-/tmp/buildq-bench-genuine}

start() {
    local buildkitd=${1:?usage: genuine_env.sh start /path/to/buildkitd [bk_port reg_port]}
    local bk_port=${2:-12345} reg_port=${3:-5065}
    mkdir -p "$DIR/reg" "$DIR/root"
    cat >"$DIR/buildkitd.toml" <<T
[registry."127.0.0.1:$reg_port"]
  http = true
  insecure = true
T
    cat >"$DIR/registry.yml" <<T
version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: $DIR/reg
  delete:
    enabled: true
http:
  addr: 127.0.0.1:$reg_port
T
    setsid nohup docker-registry serve "$DIR/registry.yml" >"$DIR/registry.log" 2>&1 </dev/null &
    echo $! >"$DIR/registry.pid"
    setsid nohup "$buildkitd" --oci-worker=true --containerd-worker=false --root "$DIR/root" \
        --addr "tcp://127.0.0.1:$bk_port" --config "$DIR/buildkitd.toml" >"$DIR/buildkitd.log" 2>&1 </dev/null &
    echo $! >"$DIR/buildkitd.pid"
    echo "tcp://127.0.0.1:$bk_port" >"$DIR/addr"
    echo "127.0.0.1:$reg_port" >"$DIR/registry"
    echo "buildkitd pid $(cat "$DIR/buildkitd.pid") on tcp://127.0.0.1:$bk_port, registry pid $(cat "$DIR/registry.pid") on 127.0.0.1:$reg_port"
}

stop() {
    local name pid
    for name in buildkitd registry; do
        [[ -f "$DIR/$name.pid" ]] || continue
        pid=$(cat "$DIR/$name.pid")
        if kill -TERM "$pid" 2>/dev/null; then
            for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            kill -KILL "$pid" 2>/dev/null || true
        fi
        rm -f "$DIR/$name.pid"
    done
    grep " $DIR/root" /proc/mounts | awk '{print $2}' | sort -r | xargs -r -n1 umount -l || true
}

case ${1:-} in
start) shift; start "$@" ;;
stop) stop ;;
*) echo "usage: genuine_env.sh start /path/to/buildkitd [bk_port reg_port] | stop" >&2; exit 2 ;;
esac
