#!/usr/bin/env bash
# A local Redis Cluster from Debian's redis-server: 3 masters and 3 replicas on loopback.
#
#   scripts/redis-cluster.sh start [BASE_PORT]   # ports BASE..BASE+5 (default 7100); prints the URL
#   scripts/redis-cluster.sh stop  [BASE_PORT]
#
# Nothing is kept on disk but the nodes' cluster files, under /tmp/webapp-redis-cluster-BASE.
# A replica takes over whatever its data's age (replica-validity-factor 0), and a shard that is
# wholly down leaves the others serving (require-full-coverage no): the settings the fault
# tests assume, and the ones to choose for a fleet that should outlive a shard.
set -euo pipefail
action=${1:-start}
base=${2:-7100}
dir=/tmp/webapp-redis-cluster-$base
ports=$(seq "$base" $((base + 5)))

stop() {
  for port in $ports; do
    if [ -f "$dir/$port.pid" ]; then
      kill "$(cat "$dir/$port.pid")" 2>/dev/null || true
    fi
  done
  for port in $ports; do
    for _ in $(seq 50); do
      redis-cli -p "$port" ping >/dev/null 2>&1 || break
      sleep 0.1
    done
  done
  rm -rf "$dir"
}

start() {
  command -v redis-server >/dev/null || { echo "redis-cluster: redis-server is not installed" >&2; exit 1; }
  stop
  mkdir -p "$dir"
  for port in $ports; do
    redis-server --port "$port" --bind 127.0.0.1 --daemonize yes --dir "$dir" \
      --cluster-enabled yes --cluster-config-file "nodes-$port.conf" --cluster-node-timeout 2000 \
      --cluster-replica-validity-factor 0 --cluster-require-full-coverage no \
      --save "" --appendonly no --pidfile "$dir/$port.pid" --logfile "$dir/$port.log"
  done
  for port in $ports; do
    for _ in $(seq 50); do
      redis-cli -p "$port" ping >/dev/null 2>&1 && break
      sleep 0.1
    done
  done
  # shellcheck disable=SC2046
  redis-cli --cluster create $(for port in $ports; do printf '127.0.0.1:%s ' "$port"; done) \
    --cluster-replicas 1 --cluster-yes >"$dir/create.log"
  for _ in $(seq 100); do
    ok=1
    for port in $ports; do
      redis-cli -p "$port" cluster info 2>/dev/null | grep -q '^cluster_state:ok' || ok=0
    done
    # and every replica attached to its master
    [ "$(redis-cli -p "$base" cluster nodes 2>/dev/null | grep -c ' slave ')" = 3 ] || ok=0
    [ "$ok" = 1 ] && break
    sleep 0.1
  done
  [ "$ok" = 1 ] || { echo "redis-cluster: the cluster did not become ready" >&2; cat "$dir/create.log" >&2; exit 1; }
  echo "redis://127.0.0.1:$base/0"
}

case "$action" in
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 start|stop [BASE_PORT]" >&2; exit 2 ;;
esac
