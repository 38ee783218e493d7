#!/usr/bin/env bash
# Run a command on a machine whose 127.0.0.1:6379 is a developer's Redis holding data, and fail
# when the command touched it (wrote to it, or even connected to it).
#
#   bash .ci/with-developer-redis.sh CMD [ARGS...]
#
# The command runs in a network namespace of its own (unshare --net, as root) whose loopback has
# a redis-server on 6379 that this script starts and seeds (a few keys in DBs 0-15, the names
# buildq and its tests use among them). Nobody else can reach that Redis, so another process
# writing to the machine's real 6379 meanwhile cannot make the check flaky, and the machine's
# real 6379 is never written to. Unix sockets (the Docker engine's) work as outside.
#
# Exit status: the command's when the Redis is untouched; 1 when the command succeeded but the
# Redis was touched (the data changed, or another connection than this script's was made).
set -euo pipefail

PORT=6379
if [[ "${1:-}" != --inside ]]; then
    [[ $# -gt 0 ]] || { echo "usage: $0 CMD [ARGS...]" >&2; exit 2; }
    exec unshare --net -- bash "${BASH_SOURCE[0]}" --inside "$@"
fi
shift

say() { echo "with-developer-redis.sh: $*" >&2; }
cli() { redis-cli -h 127.0.0.1 -p "$PORT" "$@"; }

ip link set lo up
folder="$(mktemp -d -t developer-redis-XXXXXX)"
redis-server --daemonize yes --bind 127.0.0.1 --port "$PORT" --save "" --appendonly no --databases 32 \
    --dir "$folder" --logfile "$folder/redis.log" --pidfile "$folder/redis.pid" --enable-debug-command local
for _ in $(seq 100); do cli ping >/dev/null 2>&1 && break; sleep 0.05; done

stop() {
    cli shutdown nosave >/dev/null 2>&1 || true
    rm -rf "$folder"
}
trap stop EXIT

# the developer's data: every DB the tests ever used, keys of buildq's own shapes among them
{
    for db in $(seq 0 15); do
        echo "SELECT $db"
        echo "SET developer:note:$db \"mine, db $db\""
        echo "HSET buildq:job:developer-$db state succeeded"
        echo "RPUSH builds developer-message-$db"
        echo "SET buildq:result:developer-$db {\"state\":\"succeeded\"}"
    done
} | cli >/dev/null

# one connection each: the dataset's digest and how many connections the server has accepted
snapshot() { printf 'INFO stats\nDEBUG DIGEST\n' | cli | tr -d '\r' | grep -E '^(total_connections_received:|[0-9a-f]{40}$)'; }
say "127.0.0.1:$PORT holds a developer's data ($(cli dbsize | tr -d '\r') keys in DB 0, DBs 0-15 used)"
before="$(snapshot)"

set +e
"$@"
status=$?
set -e

after="$(snapshot)"
conn_before="$(sed -n 's/^total_connections_received://p' <<<"$before")"
conn_after="$(sed -n 's/^total_connections_received://p' <<<"$after")"
digest_before="$(grep -E '^[0-9a-f]{40}$' <<<"$before")"
digest_after="$(grep -E '^[0-9a-f]{40}$' <<<"$after")"
touched=
[[ "$digest_after" == "$digest_before" ]] || touched="its data changed; "
others=$((conn_after - conn_before - 1))
((others == 0)) || touched+="$others connection(s) were made to it; "
if [[ -n "$touched" ]]; then
    say "FAIL: the developer's Redis on 127.0.0.1:$PORT was touched: ${touched%; }"
    ((status != 0)) || status=1
else
    say "the developer's Redis on 127.0.0.1:$PORT is untouched (same data, no connection)"
fi
exit "$status"
