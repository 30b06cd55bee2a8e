#!/usr/bin/env bash
# Soak: epp behind Envoy in front of PODS epp-sim model servers at a steady RATE for SECONDS,
# on the low-reuse workload (mostly distinct prompts, so epp's prefix index fills and then
# evicts). Every SAMPLE seconds it records epp's RSS, open file descriptors, prefix-index size
# and request errors to $OUT/samples.csv. Fails (exit 1) when, after the warm-up (the first
# quarter), RSS grows by more than RSS_SLACK_MIB or open descriptors by more than FD_SLACK, or
# when more than MAX_ERROR_PCT percent of requests failed. Stops everything it started.
#
# Settings (environment): SECONDS_TOTAL=1800 RATE=20 PODS=4 SAMPLE=10 RSS_SLACK_MIB=24
#   FD_SLACK=16 MAX_ERROR_PCT=1 BASE_PORT=23000 OUT=bench-results/soak
# CI runs it for 120 s (scripts/test.sh); RELIABILITY.md records a 30-minute run.
set -euo pipefail
cd "$(dirname "$0")/.."

SECONDS_TOTAL=${SECONDS_TOTAL:-1800}
RATE=${RATE:-20}
PODS=${PODS:-4}
SAMPLE=${SAMPLE:-10}
RSS_SLACK_MIB=${RSS_SLACK_MIB:-24}
FD_SLACK=${FD_SLACK:-16}
MAX_ERROR_PCT=${MAX_ERROR_PCT:-1}
BASE_PORT=${BASE_PORT:-23000}
OUT=${OUT:-bench-results/soak}

GATEWAY_PORT=$((BASE_PORT + 81))
ADMIN_PORT=$((BASE_PORT + 90))
EPP_GRPC_PORT=$((BASE_PORT + 92))
EPP_METRICS_PORT=$((BASE_PORT + 93))
EPP_HEALTH_PORT=$((BASE_PORT + 94))

scripts/setup.sh >/dev/null
cargo build --release --locked --quiet --bin epp --bin epp-sim --bin epp-bench
BIN=target/release

WORK=$(mktemp -d)
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  cp "$WORK/epp.log" "$OUT/epp.log" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

wait_http() { # url, name
  for _ in $(seq 1 300); do
    if curl -s -o /dev/null "$1"; then return 0; fi
    sleep 0.05
  done
  echo "$2 did not come up ($1)" >&2
  exit 1
}

echo "endpoints:" >"$WORK/endpoints.yaml"
for i in $(seq 0 $((PODS - 1))); do
  # Fast simulated pods: the soak is about epp, not queueing in the model servers.
  "$BIN/epp-sim" --port $((BASE_PORT + i)) --name "sim-$i" --speed 20 >"$WORK/sim-$i.log" 2>&1 &
  PIDS+=($!)
  echo "  - { address: 127.0.0.1:$((BASE_PORT + i)), name: sim-$i }" >>"$WORK/endpoints.yaml"
done
for i in $(seq 0 $((PODS - 1))); do wait_http "http://127.0.0.1:$((BASE_PORT + i))/health" "epp-sim $i"; done

"$BIN/epp" --write-certs "$WORK/tls" >/dev/null
"$BIN/epp" --bind-address 127.0.0.1 --grpc-port "$EPP_GRPC_PORT" --grpc-health-port "$EPP_HEALTH_PORT" \
  --metrics-port "$EPP_METRICS_PORT" --cert-path "$WORK/tls" --config-file config/default-plugins.yaml \
  --endpoints-file "$WORK/endpoints.yaml" >"$WORK/epp.log" 2>&1 &
EPP_PID=$!
PIDS+=($EPP_PID)
wait_http "http://127.0.0.1:$EPP_METRICS_PORT/metrics" epp
sed -e "s/port_value: 8081/port_value: $GATEWAY_PORT/" -e "s/port_value: 19000/port_value: $ADMIN_PORT/" \
    -e "s/port_value: 9002/port_value: $EPP_GRPC_PORT/" -e "s/address: 0.0.0.0/address: 127.0.0.1/" \
    -e "s|/etc/epp-tls|$WORK/tls|g" deploy/envoy/envoy.yaml >"$WORK/envoy.yaml"
.venv/bin/envoy --disable-hot-restart --concurrency 1 -l warn -c "$WORK/envoy.yaml" >"$WORK/envoy.log" 2>&1 &
PIDS+=($!)
wait_http "http://127.0.0.1:$GATEWAY_PORT/v1/models" envoy

"$BIN/epp-bench" run --url "http://127.0.0.1:$GATEWAY_PORT" --workload low --rate "$RATE" \
  --max-requests $((RATE * SECONDS_TOTAL)) --groups 64 \
  --prompts-per-group $(((RATE * SECONDS_TOTAL + 63) / 64)) --pods "$PODS" --label soak \
  --results "$WORK/bench.jsonl" --quiet >"$WORK/bench.log" 2>&1 &
BENCH_PID=$!
PIDS+=($BENCH_PID)

metric() { # name → value summed over its series
  curl -s "http://127.0.0.1:$EPP_METRICS_PORT/metrics" |
    awk -v m="$1" '$1 == m || index($1, m "{") == 1 { s += $2 } END { print s + 0 }'
}

mkdir -p "$OUT"
echo "seconds,rss_kib,open_fds,index_blocks,requests,errors" >"$OUT/samples.csv"
START=$(date +%s)
echo "soak: ${SECONDS_TOTAL}s at ${RATE} req/s over ${PODS} pods; samples every ${SAMPLE}s"
while kill -0 "$BENCH_PID" 2>/dev/null && [ $(($(date +%s) - START)) -lt "$SECONDS_TOTAL" ]; do
  sleep "$SAMPLE"
  kill -0 "$EPP_PID" 2>/dev/null || { echo "epp died" >&2; tail -20 "$WORK/epp.log" >&2; exit 1; }
  row="$(($(date +%s) - START)),$(awk '$1 == "VmRSS:" { print $2 }' "/proc/$EPP_PID/status"),$(ls "/proc/$EPP_PID/fd" | wc -l)"
  row="$row,$(metric inference_extension_prefix_indexer_size),$(metric inference_objective_request_total),$(metric inference_objective_request_error_total)"
  echo "$row" | tee -a "$OUT/samples.csv"
done
if [ $(($(date +%s) - START)) -lt $((SECONDS_TOTAL * 9 / 10)) ]; then
  echo "soak FAILED: the load ended after $(($(date +%s) - START)) of ${SECONDS_TOTAL}s" >&2
  tail -5 "$WORK/bench.log" >&2
  exit 1
fi
kill "$BENCH_PID" 2>/dev/null || true

python3 - "$OUT/samples.csv" "$RSS_SLACK_MIB" "$FD_SLACK" "$MAX_ERROR_PCT" <<'EOF'
import csv, sys
rows = [{k: float(v) for k, v in r.items()} for r in csv.DictReader(open(sys.argv[1]))]
slack_mib, fd_slack, max_err = float(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
if len(rows) < 4:
    sys.exit(f"soak: only {len(rows)} samples")
warm = rows[len(rows) // 4:]
rss_growth = (max(r["rss_kib"] for r in warm) - warm[0]["rss_kib"]) / 1024
fd_growth = max(r["open_fds"] for r in warm) - warm[0]["open_fds"]
last = rows[-1]
err_pct = 100 * last["errors"] / max(last["requests"], 1)
print(f"soak: {int(last['requests'])} requests, {err_pct:.2f}% errors; RSS {warm[0]['rss_kib']/1024:.1f}"
      f" → {last['rss_kib']/1024:.1f} MiB (peak growth after warm-up {rss_growth:.1f} MiB), open fds"
      f" {int(warm[0]['open_fds'])} → {int(last['open_fds'])}, index {int(last['index_blocks'])} blocks")
failed = []
if rss_growth > slack_mib:
    failed.append(f"RSS grew {rss_growth:.1f} MiB after warm-up (bound {slack_mib})")
if fd_growth > fd_slack:
    failed.append(f"open descriptors grew by {fd_growth:.0f} (bound {fd_slack})")
if err_pct > max_err:
    failed.append(f"{err_pct:.2f}% of requests failed (bound {max_err}%)")
if failed:
    sys.exit("soak FAILED: " + "; ".join(failed))
print("soak passed")
EOF
