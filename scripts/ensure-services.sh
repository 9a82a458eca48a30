#!/usr/bin/env bash
# Makes sure RabbitMQ (127.0.0.1:5672) and Redis (127.0.0.1:6379) are
# reachable, starting them if they are not:
#   1. local binaries (rabbitmq-server, redis-server) if installed;
#   2. otherwise `apt-get install rabbitmq-server redis-server` (root + apt);
#   3. otherwise `docker compose up -d rabbitmq redis` (a running Docker engine).
# Says what it does; exits non-zero with a clear message if nothing works.
set -euo pipefail

AMQP_HOST=127.0.0.1 AMQP_PORT=${RUNBRIDGE_CHECK_AMQP_PORT:-5672}
REDIS_HOST=127.0.0.1 REDIS_PORT=${RUNBRIDGE_CHECK_REDIS_PORT:-6379}

say() { echo "[services] $*" >&2; }
port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }
redis_ok() { port_open "$REDIS_HOST" "$REDIS_PORT" && { ! command -v redis-cli >/dev/null || redis-cli -h "$REDIS_HOST" -p "$REDIS_PORT" ping 2>/dev/null | grep -q PONG; }; }
amqp_ok() { port_open "$AMQP_HOST" "$AMQP_PORT"; }

wait_for() { # name check-fn seconds
  local name=$1 check=$2 secs=$3 i
  for ((i = 0; i < secs * 2; i++)); do
    if $check; then say "$name is up"; return 0; fi
    sleep 0.5
  done
  say "ERROR: $name did not come up within ${secs}s"; return 1
}

docker_engine() { command -v docker >/dev/null && docker info >/dev/null 2>&1; }

apt_install() {
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    say "installing $* with apt-get (this takes a minute)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
    return 0
  fi
  return 1
}

start_redis() {
  if ! command -v redis-server >/dev/null; then
    if ! apt_install redis-server; then
      if docker_engine; then say "starting redis with docker compose"; docker compose up -d redis; return; fi
      say "ERROR: Redis is not reachable on $REDIS_HOST:$REDIS_PORT and cannot be installed here."
      say "Install redis-server, or run: docker compose up -d redis"; exit 1
    fi
  fi
  say "starting redis-server on $REDIS_HOST:$REDIS_PORT"
  redis-server --daemonize yes --bind "$REDIS_HOST" --port "$REDIS_PORT" --save "" --appendonly no >/dev/null
}

start_rabbitmq() {
  if ! command -v rabbitmq-server >/dev/null; then
    if ! apt_install rabbitmq-server; then
      if docker_engine; then say "starting rabbitmq with docker compose"; docker compose up -d rabbitmq; return; fi
      say "ERROR: RabbitMQ is not reachable on $AMQP_HOST:$AMQP_PORT and cannot be installed here."
      say "Install rabbitmq-server, or run: docker compose up -d rabbitmq"; exit 1
    fi
  fi
  say "starting rabbitmq-server"
  rabbitmq-server -detached >/dev/null 2>&1 || true
}

if redis_ok; then say "redis reachable on $REDIS_HOST:$REDIS_PORT"; else start_redis; wait_for redis redis_ok 30; fi
if amqp_ok; then say "rabbitmq reachable on $AMQP_HOST:$AMQP_PORT"; else start_rabbitmq; wait_for rabbitmq amqp_ok 120; fi
# RabbitMQ accepts TCP before it is fully booted; wait for the app when we can ask.
if command -v rabbitmqctl >/dev/null; then
  timeout 120 rabbitmqctl await_startup >/dev/null 2>&1 || say "warning: rabbitmqctl await_startup did not confirm; continuing"
fi
