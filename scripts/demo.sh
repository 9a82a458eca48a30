#!/usr/bin/env bash
# `make demo`: the main job end to end against the emulator.
# Starts the Databricks emulator and `runbridge all`, publishes a handful of
# triggers, prints each completion event as it arrives, then stops what it
# started. Uses its own queue names and Redis prefix, so it never touches a
# real deployment's data on the same broker.
set -euo pipefail
cd "$(dirname "$0")/.."

BIN=${RUNBRIDGE_BIN:-target/debug/runbridge}
EMU_PORT=${DEMO_EMULATOR_PORT:-18089}
SIDECAR_PORT=${DEMO_SIDECAR_PORT:-18080}
LOGDIR=$(mktemp -d -t runbridge-demo.XXXXXX)
RUN=$(date +%H%M%S)

export RUNBRIDGE_ENV=local
export RUNBRIDGE__REDIS__KEY_PREFIX=rbdemo
export RUNBRIDGE__AMQP__TRIGGERS_QUEUE=runbridge-demo.triggers
export RUNBRIDGE__AMQP__DEAD_LETTER_EXCHANGE=runbridge-demo.dlx
export RUNBRIDGE__AMQP__DEAD_LETTER_QUEUE=runbridge-demo.triggers.dead
export RUNBRIDGE__AMQP__EVENTS_EXCHANGE=runbridge-demo.events
export RUNBRIDGE__AMQP__CONTROL_QUEUE=runbridge-demo.control
export RUNBRIDGE__SIDECAR__LISTEN=127.0.0.1:$SIDECAR_PORT
export RUNBRIDGE__SIDECAR__PUBLIC_URL=http://127.0.0.1:$SIDECAR_PORT
export DATABRICKS_HOST=http://127.0.0.1:$EMU_PORT
export DATABRICKS_TOKEN=dapi-demo
export RUNBRIDGE__RECONCILER__FIRST_POLL_MS=${RUNBRIDGE__RECONCILER__FIRST_POLL_MS:-500}
export RUNBRIDGE__RECONCILER__GRACE_MS=${RUNBRIDGE__RECONCILER__GRACE_MS:-1000}
export RUST_LOG=${RUST_LOG:-warn}

pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  echo "[demo] stopped everything it started (logs: $LOGDIR)"
}
trap cleanup EXIT

port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
for p in "$EMU_PORT" "$SIDECAR_PORT"; do
  port_free "$p" || { echo "[demo] port $p is in use; set DEMO_EMULATOR_PORT / DEMO_SIDECAR_PORT" >&2; exit 1; }
done

echo "[demo] starting the Databricks emulator on :$EMU_PORT"
"$BIN" emulate --listen "127.0.0.1:$EMU_PORT" \
  --job '101:callback:800:{"rows_written":1204}' \
  --job '102:callback:1500:report ready' \
  --job '103:fail:600' \
  --job '104:success_no_callback:700:exit value from dbutils.notebook.exit' \
  >"$LOGDIR/emulator.log" 2>&1 &
pids+=($!)
echo "[demo] starting runbridge all (worker + sidecar on :$SIDECAR_PORT)"
"$BIN" all >"$LOGDIR/runbridge.log" 2>&1 &
pids+=($!)

for _ in $(seq 1 100); do
  curl -fsS "http://127.0.0.1:$SIDECAR_PORT/readyz" >/dev/null 2>&1 && break
  sleep 0.2
done
curl -fsS "http://127.0.0.1:$SIDECAR_PORT/readyz" >/dev/null || { echo "[demo] runbridge did not become ready; see $LOGDIR/runbridge.log" >&2; exit 1; }
echo "[demo] ready. publishing triggers (each waits for its completion event):"

waiters=()
publish() { # label, then trigger args
  local label=$1; shift
  ( out=$("$BIN" trigger "$@" --wait --wait-seconds 30 --compact 2>/dev/null) \
      && python3 - "$label" "$out" <<'PY'
import json, sys
label, ev = sys.argv[1], json.loads(sys.argv[2])
d = ev["data"]
shown = d["value"] if d["state"] == "RESOLVED" else d["error"]
# One write per line: the waiters run concurrently on one terminal.
sys.stdout.write(f"[demo] {label:<34} event {ev['id']:<34} {d['state']:<17} run_id={d['run_id']} settled_by={d['settled_by']} -> {json.dumps(shown)}\n")
sys.stdout.flush()
PY
  ) || echo "[demo] $label: no completion event within 30s" &
  waiters+=($!)
}

publish "job 101 (calls back with a value)" --job-id 101 --id "demo-$RUN-sales" --param date=2026-11-23 --tag team=growth
publish "job 102 (calls back later)" --job-id 102 --id "demo-$RUN-report" --tag team=finance
publish "job 103 (fails, never calls back)" --job-id 103 --id "demo-$RUN-broken"
publish "job 104 (exits without callback)" --job-id 104 --id "demo-$RUN-exit-only"
publish "job 999 (does not exist)" --job-id 999 --id "demo-$RUN-nojob"
sleep 0.3
publish "job 101 again, same id (duplicate)" --job-id 101 --id "demo-$RUN-sales"

for w in "${waiters[@]}"; do wait "$w" || true; done
runs=$(curl -fsS "http://127.0.0.1:$EMU_PORT/emulator/stats")
echo "[demo] emulator: $runs"
echo "[demo] one run per promise id: the duplicate started nothing and got the same event id."
