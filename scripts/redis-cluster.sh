#!/usr/bin/env bash
# A private Redis Cluster for tests: 3 primaries and 3 replicas on 127.0.0.1,
# made from the installed redis-server with `redis-cli --cluster create`.
# Never touches the shared Redis on 6379.
#
#   scripts/redis-cluster.sh up DIR     start it; DIR/seeds holds the nodes'
#                                       URLs (comma-separated), DIR/<port>.pid
#                                       each node's pid (tests kill -9 one),
#                                       DIR/<port>.args its redis-server args
#   scripts/redis-cluster.sh restart DIR PORT
#                                       start a (killed) node again, with its
#                                       data and cluster config: it rejoins
#   scripts/redis-cluster.sh down DIR   stop every node and remove DIR
#
# Every node writes an append-only file with fsync always, so a node that is
# restarted keeps what it acknowledged; what a kill -9 of a primary can lose is
# what it had not yet sent to its replica (replication is asynchronous unless
# the writer asks for WAIT).
set -euo pipefail

cmd=${1:-}
dir=${2:-}
[ -n "$cmd" ] && [ -n "$dir" ] || { echo "usage: $0 up|down DIR" >&2; exit 2; }
# Absolute: redis-server changes into --dir before it opens its other files.
dir=$(realpath -m "$dir")

down() {
  for pidfile in "$dir"/*.pid; do
    [ -e "$pidfile" ] || continue
    kill -9 "$(cat "$pidfile")" 2>/dev/null || true
  done
  rm -rf "$dir"
}

port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

case "$cmd" in
  down) down; exit 0 ;;
  restart)
    port=${3:?usage: $0 restart DIR PORT}
    # shellcheck disable=SC2046
    redis-server $(cat "$dir/$port.args") --save ""
    exit 0 ;;
  up) ;;
  *) echo "usage: $0 up|down DIR" >&2; exit 2 ;;
esac

command -v redis-server >/dev/null && command -v redis-cli >/dev/null \
  || { echo "redis-server and redis-cli are needed (apt-get install redis-server)" >&2; exit 1; }
mkdir -p "$dir"
# Six client ports and six bus ports, below the ephemeral range (a killed
# node's port cannot be taken by an outgoing connection meanwhile).
for _ in $(seq 50); do
  base=$((20000 + (RANDOM % 500) * 20))
  ok=1
  for i in 0 1 2 3 4 5; do
    port_free $((base + i)) && port_free $((base + 10 + i)) || { ok=0; break; }
  done
  [ $ok = 1 ] && break
done
[ $ok = 1 ] || { echo "no free ports for a Redis Cluster" >&2; exit 1; }

nodes=()
for i in 0 1 2 3 4 5; do
  port=$((base + i))
  mkdir -p "$dir/$port"
  # (--save "" is passed apart: the args file is split on spaces.)
  echo "--port $port --bind 127.0.0.1 --cluster-enabled yes \
    --cluster-port $((base + 10 + i)) \
    --cluster-config-file $dir/$port/nodes.conf --cluster-node-timeout 2000 \
    --appendonly yes --appendfsync always --dir $dir/$port \
    --daemonize yes --pidfile $dir/$port.pid --logfile $dir/$port/redis.log" > "$dir/$port.args"
  # shellcheck disable=SC2046
  redis-server $(cat "$dir/$port.args") --save ""
  nodes+=("127.0.0.1:$port")
done
for n in "${nodes[@]}"; do
  for _ in $(seq 100); do
    redis-cli -h 127.0.0.1 -p "${n#*:}" ping >/dev/null 2>&1 && break
    sleep 0.1
  done
done
redis-cli --cluster create "${nodes[@]}" --cluster-replicas 1 --cluster-yes >"$dir/create.log"
for _ in $(seq 100); do
  redis-cli -p "$base" cluster info | grep -q 'cluster_state:ok' && break
  sleep 0.2
done
redis-cli -p "$base" cluster info | grep -q 'cluster_state:ok' \
  || { echo "cluster did not become ok; see $dir" >&2; exit 1; }
# Until every replica has synced with its primary (a failover before that
# finds no replica to promote).
for _ in $(seq 150); do
  up=0
  for n in "${nodes[@]}"; do
    redis-cli -p "${n#*:}" info replication | grep -q 'master_link_status:up' && up=$((up + 1))
  done
  [ $up = 3 ] && break
  sleep 0.2
done
[ $up = 3 ] || { echo "replicas did not sync; see $dir" >&2; exit 1; }
printf '%s\n' "${nodes[@]}" | sed 's|^|redis://|' | paste -sd, > "$dir/seeds"
echo "Redis Cluster up: $(cat "$dir/seeds")"
