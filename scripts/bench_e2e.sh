#!/usr/bin/env bash
# End-to-end benchmark through the real stack: K epp-sim model servers, then
#   1. Envoy + epp (V2 scheduler with prefix-cache scoring, GIE default weights 2/2/3)
#   2. Envoy alone, round-robin
# each with fresh model servers (cold caches), driven by epp-bench with the same workload.
# Prints the table and writes it with a plot to $OUT. Stops everything it started.
#
# Settings (environment): PODS=4 RATE=8 REQUESTS=256 PREFIX_GROUPS=64 PROMPTS_PER_GROUP=4
#   WORKLOAD=high SPEED=1 BASE_PORT=18000 OUT=bench-results/e2e
set -euo pipefail
cd "$(dirname "$0")/.."

PODS=${PODS:-4}
RATE=${RATE:-8}
REQUESTS=${REQUESTS:-256}
PREFIX_GROUPS=${PREFIX_GROUPS:-64}
PROMPTS_PER_GROUP=${PROMPTS_PER_GROUP:-4}
WORKLOAD=${WORKLOAD:-high}
SPEED=${SPEED:-1}
BASE_PORT=${BASE_PORT:-18000}
OUT=${OUT:-bench-results/e2e}

GATEWAY_PORT=$((BASE_PORT + 81))
ADMIN_PORT=$((BASE_PORT + 90))
EPP_GRPC_PORT=$((BASE_PORT + 92))
EPP_METRICS_PORT=$((BASE_PORT + 93))
# health: BASE_PORT + 94

scripts/setup.sh >/dev/null
echo "building epp, epp-sim, epp-bench (release)…"
cargo build --release --locked --quiet --bin epp --bin epp-sim --bin epp-bench
BIN=target/release

WORK=$(mktemp -d)
PIDS=()
SIM_PIDS=()
stop() {
  for pid in "$@"; do kill "$pid" 2>/dev/null || true; done
  for pid in "$@"; do wait "$pid" 2>/dev/null || true; done
}
cleanup() {
  stop "${PIDS[@]}" "${SIM_PIDS[@]}"
  rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

wait_http() { # url, name
  for _ in $(seq 1 200); do
    if curl -sf -o /dev/null "$1"; then return 0; fi
    sleep 0.05
  done
  echo "$2 did not come up ($1)" >&2
  return 1
}

start_sims() {
  SIM_PIDS=()
  for i in $(seq 0 $((PODS - 1))); do
    "$BIN/epp-sim" --port $((BASE_PORT + i)) --name "sim-$i" --speed "$SPEED" >"$WORK/sim-$i.log" 2>&1 &
    SIM_PIDS+=($!)
  done
  for i in $(seq 0 $((PODS - 1))); do wait_http "http://127.0.0.1:$((BASE_PORT + i))/health" "epp-sim $i"; done
}

start_envoy() { # config
  "$VENV_ENVOY" --disable-hot-restart --concurrency 2 -l warn -c "$1" >"$WORK/envoy.log" 2>&1 &
  ENVOY_PID=$!
  PIDS+=($ENVOY_PID)
  wait_http "http://127.0.0.1:$GATEWAY_PORT/v1/models" "envoy"
}

VENV_ENVOY=.venv/bin/envoy
RESULTS="$WORK/results.jsonl"
BENCH=("$BIN/epp-bench" run --url "http://127.0.0.1:$GATEWAY_PORT" --workload "$WORKLOAD"
       --rate "$RATE" --max-requests "$REQUESTS" --groups "$PREFIX_GROUPS"
       --prompts-per-group "$PROMPTS_PER_GROUP" --pods "$PODS" --results "$RESULTS")

# 1. Envoy + epp.
start_sims
{
  echo "endpoints:"
  for i in $(seq 0 $((PODS - 1))); do
    echo "  - address: 127.0.0.1:$((BASE_PORT + i))"
    echo "    name: sim-$i"
  done
} >"$WORK/endpoints.yaml"
EXPERIMENTAL_USE_SCHEDULER_V2=true ENABLE_PREFIX_CACHE_SCHEDULING=true \
QUEUE_SCORE_WEIGHT=2 KV_CACHE_SCORE_WEIGHT=2 PREFIX_CACHE_SCORE_WEIGHT=3 \
  "$BIN/epp" --bind-address 127.0.0.1 --grpc-health-port $((BASE_PORT + 94)) \
    --grpc-port "$EPP_GRPC_PORT" --metrics-port "$EPP_METRICS_PORT" \
    --endpoints-file "$WORK/endpoints.yaml" >"$WORK/epp.log" 2>&1 &
EPP_PID=$!
PIDS+=($EPP_PID)
wait_http "http://127.0.0.1:$EPP_METRICS_PORT/metrics" "epp"
sed -e "s/port_value: 8081/port_value: $GATEWAY_PORT/" \
    -e "s/port_value: 19000/port_value: $ADMIN_PORT/" \
    -e "s/port_value: 9002/port_value: $EPP_GRPC_PORT/" \
    -e "s/address: 0.0.0.0/address: 127.0.0.1/" \
    deploy/envoy/envoy.yaml >"$WORK/envoy-epp.yaml"
start_envoy "$WORK/envoy-epp.yaml"
echo "== Envoy + epp: $REQUESTS requests at $RATE req/s over $PODS simulated pods"
"${BENCH[@]}" --label "epp (v2+prefix)"
stop "$ENVOY_PID" "$EPP_PID" "${SIM_PIDS[@]}"

# 2. Envoy alone, round-robin, fresh model servers.
start_sims
{
  sed -n '1,/# ENDPOINTS/p' deploy/envoy/envoy-round-robin.yaml
  for i in $(seq 0 $((PODS - 1))); do
    echo "        - endpoint: { address: { socket_address: { address: 127.0.0.1, port_value: $((BASE_PORT + i)) } } }"
  done
} | sed -e "s/port_value: 8081/port_value: $GATEWAY_PORT/" \
        -e "s/port_value: 19000/port_value: $ADMIN_PORT/" \
        -e "s/address: 0.0.0.0/address: 127.0.0.1/" >"$WORK/envoy-rr.yaml"
start_envoy "$WORK/envoy-rr.yaml"
echo "== Envoy alone (round-robin): same workload, fresh model servers"
"${BENCH[@]}" --label "round-robin (Envoy alone)"

echo
echo "== Results ($WORKLOAD reuse, $PODS pods, $RATE req/s, $REQUESTS requests)"
"$BIN/epp-bench" report --results "$RESULTS" --out "$OUT" \
  --title "TTFT through Envoy: epp vs round-robin ($PODS simulated H100 pods)"
