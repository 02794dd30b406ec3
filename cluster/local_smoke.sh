#!/usr/bin/env bash
# Cluster path on this machine: a Ray head on 127.0.0.1 with token auth, `ray job submit` of the
# tiny two-knob sweep, its report, and the head stopped again whatever happens.
#   cluster/local_smoke.sh [extra key=value overrides]
# Only this head's processes are stopped (found by a marker in their environment): `ray stop`
# would stop every Ray on the machine.
set -euo pipefail
cd "$(dirname "$0")/.."
P=${PYTHON:-.venv/bin/python}
PY="$(cd "$(dirname "$P")" && pwd)/$(basename "$P")"   # absolute: the job runs in its own folder
RAY_BIN="$(dirname "$PY")/ray"
WORK=$(mktemp -d /tmp/xsmoke.XXXXXX)            # short path: Unix sockets live under it
free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
DASH=$(free_port)
export XMODAL_SMOKE_CLUSTER=$WORK
export RAY_AUTH_MODE=token
export RAY_AUTH_TOKEN=$("$PY" -c 'import secrets; print(secrets.token_hex(32))')
export RAY_API_SERVER_ADDRESS=http://127.0.0.1:$DASH
unset RAY_ADDRESS

stop_head() {
  for sig in TERM KILL; do
    for pid in $(grep -lsz "^XMODAL_SMOKE_CLUSTER=$WORK$" /proc/[0-9]*/environ | cut -d/ -f3); do
      [ "$pid" != "$$" ] && kill -s $sig "$pid" 2>/dev/null || true
    done
    sleep 3
  done
  rm -rf "$WORK/ray"
}
trap stop_head EXIT

"$RAY_BIN" start --head --node-ip-address=127.0.0.1 --dashboard-host=127.0.0.1 --include-dashboard=true \
  --dashboard-port="$DASH" --port="$(free_port)" --ray-client-server-port="$(free_port)" \
  --dashboard-agent-listen-port="$(free_port)" --dashboard-agent-grpc-port="$(free_port)" \
  --runtime-env-agent-port="$(free_port)" --metrics-export-port="$(free_port)" \
  --num-cpus=4 --disable-usage-stats --temp-dir="$WORK/ray" \
  --system-config='{"idle_worker_killing_time_threshold_ms":600000}'

"$RAY_BIN" job submit --address "$RAY_API_SERVER_ADDRESS" --submission-id "xmodal-smoke-$(date +%s)" \
  --working-dir . --runtime-env cluster/runtime_env.local.yaml --entrypoint-num-cpus 0 -- \
  "$PY" -m xmodal.cli.main sweep experiments/sweeps/smoke.yaml \
  "data.root=$WORK/world" "sweep.storage=$WORK/sweeps" sweep.num_samples=2 train.epochs=1 "$@"

echo "sweep folder: $WORK/sweeps/smoke (report in $WORK/sweeps/smoke/report)"
