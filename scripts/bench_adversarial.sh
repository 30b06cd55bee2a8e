#!/usr/bin/env bash
# Memory under adversarial bodies: CLIENTS concurrent requests of BODY_MIB MiB each of
# `{"model":"m","prompt":[[],[],…]}` (what a JSON-tree parser expands 10–16×) through Envoy
# (the shipped config) into epp with its default limits (32 MiB per body, 256 MiB held at
# once), ROUNDS times. Reports the status counts, epp's peak RSS (VmHWM), and whether a normal
# request is served afterwards. Target: peak RSS under 512 MiB, and epp serves on.
#
# Settings (environment): CLIENTS=16 BODY_MIB=32 ROUNDS=3 BASE_PORT=24000
set -euo pipefail
cd "$(dirname "$0")/.."

CLIENTS=${CLIENTS:-16}
BODY_MIB=${BODY_MIB:-32}
ROUNDS=${ROUNDS:-3}
BASE_PORT=${BASE_PORT:-24000}
GATEWAY_PORT=$((BASE_PORT + 81))
ADMIN_PORT=$((BASE_PORT + 90))
EPP_PORT=$((BASE_PORT + 92))
METRICS_PORT=$((BASE_PORT + 93))
HEALTH_PORT=$((BASE_PORT + 94))

scripts/setup.sh >/dev/null
cargo build --release --locked --quiet --bin epp --example bench_upstream
WORK=$(mktemp -d)
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

target/release/examples/bench_upstream "127.0.0.1:$BASE_PORT" 2>/dev/null &
PIDS+=($!)
printf 'endpoints:\n  - { address: 127.0.0.1:%s, name: up }\n' "$BASE_PORT" >"$WORK/endpoints.yaml"
target/release/epp --bind-address 127.0.0.1 --grpc-port "$EPP_PORT" --grpc-health-port "$HEALTH_PORT" \
  --metrics-port "$METRICS_PORT" --secure-serving=false --config-file config/default-plugins.yaml \
  --endpoints-file "$WORK/endpoints.yaml" >"$WORK/epp.log" 2>&1 &
EPP_PID=$!
PIDS+=($EPP_PID)
sed -e '/^ *# tls:begin$/,/^ *# tls:end$/d' -e "s/port_value: 8081/port_value: $GATEWAY_PORT/" \
    -e "s/port_value: 19000/port_value: $ADMIN_PORT/" -e "s/port_value: 9002/port_value: $EPP_PORT/" \
    -e "s/address: 0.0.0.0/address: 127.0.0.1/" deploy/envoy/envoy.yaml >"$WORK/envoy.yaml"
.venv/bin/envoy --disable-hot-restart --concurrency 2 -l error -c "$WORK/envoy.yaml" >"$WORK/envoy.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 1 200); do curl -s -o /dev/null "http://127.0.0.1:$GATEWAY_PORT/v1/models" && break; sleep 0.05; done

python3 - "$WORK/body.json" "$BODY_MIB" <<'EOF'
import sys
path, mib = sys.argv[1], int(sys.argv[2])
n = (mib * 1024 * 1024 - 40) // 3
with open(path, "w") as f:
    f.write('{"model":"m","prompt":[' + ",".join(["[]"] * n) + "]}")
EOF
echo "epp idle RSS: $(awk '/VmRSS/ {print $2}' /proc/$EPP_PID/status) KiB; body $(stat -c %s "$WORK/body.json") bytes"

for round in $(seq 1 "$ROUNDS"); do
  CURLS=()
  for i in $(seq 1 "$CLIENTS"); do
    curl -s -o /dev/null -w "%{http_code}\n" -H 'content-type: application/json' \
      --data-binary @"$WORK/body.json" "http://127.0.0.1:$GATEWAY_PORT/v1/completions" >"$WORK/status-$round-$i" &
    CURLS+=($!)
  done
  wait "${CURLS[@]}" || true
  echo "round $round: statuses $(cat "$WORK"/status-"$round"-* | sort | uniq -c | tr '\n' ' ')"
done
peak=$(awk '/VmHWM/ {print $2}' /proc/$EPP_PID/status)
after=$(curl -s -o /dev/null -w "%{http_code}" -H 'content-type: application/json' \
  -d '{"model":"m","prompt":"still there?"}' "http://127.0.0.1:$GATEWAY_PORT/v1/completions")
echo "epp peak RSS: $((peak / 1024)) MiB (target < 512 MiB); a normal request afterwards: $after"
[ "$after" = 200 ] && [ "$peak" -lt $((512 * 1024)) ]
