#!/usr/bin/env bash
# End-to-end benchmark through real processes: K epp-sim model servers behind each of
#   epp          Envoy + epp with config/default-plugins.yaml
#   epp-gie      Envoy + epp with GIE's weights (config/gie-plugins.yaml)
#   epp-llm-d    Envoy + epp with llm-d's sticky chain (config/llm-d-plugins.yaml)
#   epp-nosat    Envoy + epp with the default config but saturated holders off
#                (saturationRatio: 0)
#   epp-noeject  Envoy + epp with the default config but outlier ejection off
#                (--outlier-consecutive-5xx 0)
#   epp-base     Envoy + the epp binary at $BASE_EPP, default config or $BASE_CONFIG (an
#                A/B against another build, with that build's own config)
#   epp-config   Envoy + epp with the plugins config file at $EPP_CONFIG (an A/B of configs)
#   sglang       sglang-router --policy cache_aware (the PyPI package, a real peer router)
#   round-robin  Envoy alone
# each with fresh model servers (cold caches), driven by epp-bench with the same workload.
# Prints the table and writes it with the pictures to $OUT. Stops everything it started.
#
# Settings (environment): SYSTEMS="epp sglang round-robin" PODS=4 WORKLOAD=high RATE=16
#   REQUESTS=480 PREFIX_GROUPS=16 PROMPTS_PER_GROUP=30 SPEED=1 LATE_METRICS=1 FAILING_PODS=0
#   FAIL_METRICS=0 BLIND_PODS=0 METRIC_NAMES=vllm
#   SLOW_PODS=0 SLOW_SPEED=0.25 CLIENT_TIMEOUT=120s BASE_PORT=18000 OUT=bench-results/e2e
#   KV_BLOCKS= (each pod's KV-cache blocks; default epp-sim's, an H100 with Llama-2-7B)
#   MAX_NUM_SEQS= (sequences each pod runs at once; default epp-sim's 256, vLLM's default)
#   PREFIX_CACHING=1 (0: the pods reuse no cached prefix, vLLM's --no-enable-prefix-caching)
#   STREAM=1 (0: clients ask for whole responses, "stream": false; the TTFT columns are then
#     the end-to-end time)
#   EPP_ARGS= (extra flags for every epp system, e.g. "--refresh-metrics-interval 250ms")
#   ENVOY_EPP=deploy/envoy/envoy.yaml (the Envoy config in front of every epp system)
# The model servers leave the vllm:* families off /metrics until their first request
# (LATE_METRICS=1), as the simulator of the last external trial did. FAILING_PODS=N: the
# first N pods answer every request at once with 500 (a dead engine behind a live API
# server, its /metrics still showing an idle engine); failed requests get their own column.
# FAIL_METRICS=share: every pod answers that share of /metrics requests with 503 (a flaky
# exporter); BLIND_PODS=N: the first N pods answer every one so (metrics never readable).
# METRIC_NAMES=sglang: the pods export SGLang's metric names (the endpoints file names no
# engine, so epp reads them by what the pages show). SLOW_PODS=N: the last N pods run at
# SLOW_SPEED × SPEED (a slower GPU in a mixed fleet; a tiny SLOW_SPEED such as 0.00001 makes
# a hung engine). CLIENT_TIMEOUT: how long the load
# client waits for a request before giving up (and counting it failed).
set -euo pipefail
cd "$(dirname "$0")/.."

SYSTEMS=${SYSTEMS:-"epp sglang round-robin"}
PODS=${PODS:-4}
WORKLOAD=${WORKLOAD:-high}
RATE=${RATE:-16}
REQUESTS=${REQUESTS:-480}
PREFIX_GROUPS=${PREFIX_GROUPS:-16}
PROMPTS_PER_GROUP=${PROMPTS_PER_GROUP:-30}
SPEED=${SPEED:-1}
LATE_METRICS=${LATE_METRICS:-1}
FAILING_PODS=${FAILING_PODS:-0}
FAIL_METRICS=${FAIL_METRICS:-0}
BLIND_PODS=${BLIND_PODS:-0}
METRIC_NAMES=${METRIC_NAMES:-vllm}
SLOW_PODS=${SLOW_PODS:-0}
SLOW_SPEED=${SLOW_SPEED:-0.25}
CLIENT_TIMEOUT=${CLIENT_TIMEOUT:-120s}
KV_BLOCKS=${KV_BLOCKS:-}
MAX_NUM_SEQS=${MAX_NUM_SEQS:-}
PREFIX_CACHING=${PREFIX_CACHING:-1}
STREAM=${STREAM:-1}
read -r -a EPP_EXTRA <<<"${EPP_ARGS:-}"
ENVOY_EPP=${ENVOY_EPP:-deploy/envoy/envoy.yaml}
BASE_PORT=${BASE_PORT:-18000}
OUT=${OUT:-bench-results/e2e}

GATEWAY_PORT=$((BASE_PORT + 81))
ADMIN_PORT=$((BASE_PORT + 90))
EPP_GRPC_PORT=$((BASE_PORT + 92))
EPP_METRICS_PORT=$((BASE_PORT + 93))
EPP_HEALTH_PORT=$((BASE_PORT + 94))
SGLANG_METRICS_PORT=$((BASE_PORT + 95))

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
  for _ in $(seq 1 300); do
    if curl -sf -o /dev/null "$1"; then return 0; fi
    sleep 0.05
  done
  echo "$2 did not come up ($1)" >&2
  return 1
}

start_sims() {
  SIM_PIDS=()
  local sim_args=()
  if [ "$LATE_METRICS" = 1 ]; then sim_args=(--metrics-after-first-request); fi
  if [ -n "$KV_BLOCKS" ]; then sim_args+=(--kv-blocks "$KV_BLOCKS"); fi
  if [ -n "$MAX_NUM_SEQS" ]; then sim_args+=(--max-num-seqs "$MAX_NUM_SEQS"); fi
  if [ "$PREFIX_CACHING" = 0 ]; then sim_args+=(--no-enable-prefix-caching); fi
  sim_args+=(--metric-names "$METRIC_NAMES")
  for i in $(seq 0 $((PODS - 1))); do
    local fail=0 speed=$SPEED fail_metrics=$FAIL_METRICS
    if [ "$i" -lt "$FAILING_PODS" ]; then fail=1; fi
    if [ "$i" -lt "$BLIND_PODS" ]; then fail_metrics=1; fi
    if [ "$i" -ge $((PODS - SLOW_PODS)) ]; then speed=$(python3 -c "print($SPEED * $SLOW_SPEED)"); fi
    "$BIN/epp-sim" --port $((BASE_PORT + i)) --name "sim-$i" --speed "$speed" "${sim_args[@]}" \
      --fail-requests "$fail" --fail-metrics "$fail_metrics" >"$WORK/sim-$i.log" 2>&1 &
    SIM_PIDS+=($!)
  done
  for i in $(seq 0 $((PODS - 1))); do wait_http "http://127.0.0.1:$((BASE_PORT + i))/health" "epp-sim $i"; done
}

start_envoy() { # config
  "$VENV_ENVOY" --disable-hot-restart --concurrency 2 -l warn -c "$1" >"$WORK/envoy.log" 2>&1 &
  PIDS+=($!)
  wait_http "http://127.0.0.1:$GATEWAY_PORT/v1/models" "envoy"
}

start_epp() { # plugins config file, then extra epp flags
  {
    echo "endpoints:"
    for i in $(seq 0 $((PODS - 1))); do
      echo "  - address: 127.0.0.1:$((BASE_PORT + i))"
      echo "    name: sim-$i"
    done
  } >"$WORK/endpoints.yaml"
  # TLS as shipped: Envoy verifies epp's certificate against a local CA.
  [ -d "$WORK/tls" ] || "$BIN/epp" --write-certs "$WORK/tls" >/dev/null
  "${EPP_BIN:-$BIN/epp}" --bind-address 127.0.0.1 --grpc-health-port "$EPP_HEALTH_PORT" \
    --grpc-port "$EPP_GRPC_PORT" --metrics-port "$EPP_METRICS_PORT" --cert-path "$WORK/tls" \
    --config-file "$1" --endpoints-file "$WORK/endpoints.yaml" "${EPP_EXTRA[@]}" "${@:2}" \
    >"$WORK/epp.log" 2>&1 &
  PIDS+=($!)
  wait_http "http://127.0.0.1:$EPP_METRICS_PORT/metrics" "epp"
  sed -e "s/port_value: 8081/port_value: $GATEWAY_PORT/" \
      -e "s/port_value: 19000/port_value: $ADMIN_PORT/" \
      -e "s/port_value: 9002/port_value: $EPP_GRPC_PORT/" \
      -e "s/address: 0.0.0.0/address: 127.0.0.1/" -e "s|/etc/epp-tls|$WORK/tls|g" \
      "$ENVOY_EPP" >"$WORK/envoy-epp.yaml"
  start_envoy "$WORK/envoy-epp.yaml"
}

start_round_robin() {
  {
    sed -n '1,/# ENDPOINTS/p' deploy/envoy/envoy-round-robin.yaml
    for i in $(seq 0 $((PODS - 1))); do
      echo "        - endpoint: { address: { socket_address: { address: 127.0.0.1, port_value: $((BASE_PORT + i)) } } }"
    done
  } | sed -e "s/port_value: 8081/port_value: $GATEWAY_PORT/" \
          -e "s/port_value: 19000/port_value: $ADMIN_PORT/" \
          -e "s/address: 0.0.0.0/address: 127.0.0.1/" >"$WORK/envoy-rr.yaml"
  start_envoy "$WORK/envoy-rr.yaml"
}

start_sglang() {
  local workers=()
  for i in $(seq 0 $((PODS - 1))); do workers+=("http://127.0.0.1:$((BASE_PORT + i))"); done
  .venv/bin/sglang-router launch --host 127.0.0.1 --port "$GATEWAY_PORT" \
    --prometheus-host 127.0.0.1 --prometheus-port "$SGLANG_METRICS_PORT" \
    --policy cache_aware --worker-urls "${workers[@]}" --log-level warn >"$WORK/sglang.log" 2>&1 &
  PIDS+=($!)
  wait_http "http://127.0.0.1:$GATEWAY_PORT/health" "sglang-router"
}

VENV_ENVOY=.venv/bin/envoy
RESULTS="$WORK/results.jsonl"
BENCH=("$BIN/epp-bench" run --url "http://127.0.0.1:$GATEWAY_PORT" --workload "$WORKLOAD"
       --rate "$RATE" --max-requests "$REQUESTS" --groups "$PREFIX_GROUPS"
       --prompts-per-group "$PROMPTS_PER_GROUP" --pods "$PODS" --results "$RESULTS"
       --timeout "$CLIENT_TIMEOUT" --tolerate-failures)
if [ "$STREAM" = 0 ]; then BENCH+=(--no-stream); fi

for system in $SYSTEMS; do
  start_sims
  case "$system" in
    epp) start_epp config/default-plugins.yaml; label="epp" ;;
    epp-gie) start_epp config/gie-plugins.yaml; label="epp, GIE 2/2/3" ;;
    epp-llm-d) start_epp config/llm-d-plugins.yaml; label="epp, llm-d sticky" ;;
    epp-nosat)
      sed 's/saturationRatio: 1.5/saturationRatio: 0/' config/default-plugins.yaml >"$WORK/nosat.yaml"
      start_epp "$WORK/nosat.yaml"; label="epp, saturation off" ;;
    epp-noeject)
      start_epp config/default-plugins.yaml --outlier-consecutive-5xx 0
      label="epp, ejection off" ;;
    epp-base)
      EPP_BIN=${BASE_EPP:?epp-base needs BASE_EPP=path to an epp binary} \
        start_epp "${BASE_CONFIG:-config/default-plugins.yaml}"
      label="epp, base build" ;;
    epp-config)
      start_epp "${EPP_CONFIG:?epp-config needs EPP_CONFIG=path to a plugins config file}"
      label="epp, $(basename "$EPP_CONFIG")" ;;
    sglang) start_sglang; label="sglang-router cache_aware" ;;
    round-robin) start_round_robin; label="Envoy round-robin" ;;
    *) echo "unknown system $system" >&2; exit 2 ;;
  esac
  echo "== $label: $REQUESTS $WORKLOAD requests at $RATE req/s over $PODS simulated pods"
  "${BENCH[@]}" --label "$label"
  stop "${PIDS[@]}" "${SIM_PIDS[@]}"
  PIDS=()
  SIM_PIDS=()
done

echo
echo "== Results ($WORKLOAD, $PODS pods, $RATE req/s, $REQUESTS requests)"
"$BIN/epp-bench" report --results "$RESULTS" --out "$OUT" \
  --context "$PODS epp-sim pods, real processes"
cp "$RESULTS" "$OUT/results.jsonl"
