#!/usr/bin/env bash
# The whole ext_proc path at wire speed. Four upstreams that answer at once (bench_upstream,
# one thread) behind a real Envoy (--concurrency 1), driven by a closed-loop HTTP/1.1 load
# generator (bench_load, one thread, CONNECTIONS keep-alive connections), in these setups:
#   envoy         Envoy alone, round-robin (the ceiling)
#   naive         Envoy + a naive minimal ext_proc picker (examples/naive_picker.rs: buffer,
#                 xxh3, pick, re-emit, echo response chunks; FULL_DUPLEX_STREAMED both ways;
#                 plaintext gRPC)
#   epp           Envoy + epp, default plugins, deploy/envoy/envoy.yaml (request and response
#                 bodies STREAMED, sent without waiting for the headers' answer), plaintext gRPC
#                 like the naive picker
#   epp-duplex    the same with request bodies FULL_DUPLEX_STREAMED (epp echoes the body)
#   epp-duplexresp  request and response bodies FULL_DUPLEX_STREAMED (epp echoes every
#                 chunk both ways), as the Go EPP's gateways configure it
#   epp-16streams epp with at most 16 ext_proc streams per connection (the cap shipped
#                 before): Envoy's one worker opens several connections, dealt across epp's
#                 serving threads
#   epp-buffered  epp with request_body_mode BUFFERED
#   epp-routeonly epp behind deploy/envoy/envoy-route-only.yaml: no response bodies to epp
#                 (no per-chunk messages)
#   epp-tls       epp with its default TLS
#   epp-base      as epp, but the epp binary at $BASE_EPP (an A/B against another build)
# For each body size: req/s at CONNECTIONS, the path time (first request byte sent → request
# head at the upstream) p50/p99 with one connection (unloaded), the picker's CPU µs per request
# (utime+stime from /proc) and Envoy's, and epp's allocated bytes per request (an alloc-stats build, in a
# separate short run). Then a streamed response of SSE_CHUNKS events: picker CPU per chunk.
#
# Settings (environment): SETUPS="envoy naive epp-16streams epp epp-duplex epp-buffered epp-duplexresp" SIZES="1024 32768 204800 2097152"
#   CONNECTIONS=32 SECONDS_PER_RUN=8 SSE_CHUNKS=500 BASE_PORT=20000 OUT=bench-results/extproc
#   PROFILE=dir: record the picker with `perf record -e cpu-clock -g` during throughput runs.
#   SYSCALLS=dir: count the picker's main system calls and context switches (`perf stat`
#   tracepoints) during throughput runs; divide by the run's ext_proc messages.
#   MEMORY_SECONDS=30 (0: skip): epp's idle RSS, then 1M-token (4 MB) prompts at 10 QPS over 10
#   endpoints through Envoy (the shipped config) for that long: peak RSS (VmHWM) and final RSS.
# Prints a markdown table; writes it and results.jsonl to $OUT. Stops everything it started.
set -euo pipefail
cd "$(dirname "$0")/.."

SETUPS=${SETUPS:-"envoy naive epp-16streams epp epp-duplex epp-buffered epp-duplexresp"}
SIZES=${SIZES:-"1024 32768 204800 2097152"}
CONNECTIONS=${CONNECTIONS:-32}
SECONDS_PER_RUN=${SECONDS_PER_RUN:-8}
SSE_CHUNKS=${SSE_CHUNKS:-500}
MEMORY_SECONDS=${MEMORY_SECONDS:-30}
BASE_PORT=${BASE_PORT:-20000}
OUT=${OUT:-bench-results/extproc}

GATEWAY_PORT=$((BASE_PORT + 81))
ADMIN_PORT=$((BASE_PORT + 90))
PICKER_PORT=$((BASE_PORT + 92))
EPP_METRICS_PORT=$((BASE_PORT + 93))
EPP_HEALTH_PORT=$((BASE_PORT + 94))
UPSTREAMS="" # the 4 the setups route to
for i in 0 1 2 3; do UPSTREAMS="$UPSTREAMS${UPSTREAMS:+,}127.0.0.1:$((BASE_PORT + i))"; done
ALL_UPSTREAMS="" # 10, for the memory run
for i in $(seq 0 9); do ALL_UPSTREAMS="$ALL_UPSTREAMS${ALL_UPSTREAMS:+,}127.0.0.1:$((BASE_PORT + i))"; done

scripts/setup.sh >/dev/null
echo "building epp (plain, and with alloc-stats in target/alloc-stats) and the bench fixtures…"
cargo build --release --locked --quiet --bin epp \
  --example bench_upstream --example bench_load --example naive_picker
# Its own target directory: toggling the feature in target/ would rebuild epp twice per run.
cargo build --release --locked --quiet --features alloc-stats --bin epp --target-dir target/alloc-stats
BIN=target/release
EX=target/release/examples
CLK_TCK=$(getconf CLK_TCK)
SYSCALL_EVENTS=raw_syscalls:sys_enter,context-switches
for call in epoll_wait recvfrom writev futex; do SYSCALL_EVENTS="$SYSCALL_EVENTS,syscalls:sys_enter_$call"; done

WORK=$(mktemp -d)
PIDS=()
stop_all() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  PIDS=()
}
cleanup() {
  stop_all
  [ -n "${UPSTREAM_PID:-}" ] && kill "$UPSTREAM_PID" 2>/dev/null
  rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

wait_http() { # url, name
  for _ in $(seq 1 300); do
    if curl -s -o /dev/null "$1"; then return 0; fi
    sleep 0.05
  done
  echo "$2 did not come up ($1)" >&2
  return 1
}

cpu_ticks() { # pid → utime+stime in clock ticks (0 without a pid)
  if [ -z "$1" ]; then echo 0; return; fi
  awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$1/stat"
}

alloc_stats() { # → "bytes allocations" since epp started
  curl -s "http://127.0.0.1:$EPP_METRICS_PORT/metrics" |
    awk '/^epp_allocated_bytes_total / { b = $2 } /^epp_allocations_total / { n = $2 }
         END { print b, n }'
}

ext_proc_msgs() { # messages Envoy has sent to the picker so far
  curl -s "http://127.0.0.1:$ADMIN_PORT/stats?filter=ext_proc" |
    awk -F': ' '/ext_proc\.stream_msgs_sent:/ { n += $2 } END { print n + 0 }'
}

local_envoy() { # template → rendered config on loopback ports
  sed -e "s/port_value: 8081/port_value: $GATEWAY_PORT/" \
      -e "s/port_value: 19000/port_value: $ADMIN_PORT/" \
      -e "s/port_value: 9002/port_value: $PICKER_PORT/" \
      -e "s/address: 0.0.0.0/address: 127.0.0.1/" "$@"
}

start_envoy() { # config
  .venv/bin/envoy --disable-hot-restart --concurrency 1 -l warn -c "$1" >"$WORK/envoy.log" 2>&1 &
  ENVOY_PID=$!
  PIDS+=($!)
  wait_http "http://127.0.0.1:$GATEWAY_PORT/v1/models" envoy || { cat "$WORK"/*.log >&2; exit 1; }
}

start_epp() { # binary, tls(true|false) [endpoints, default 4]
  {
    echo "endpoints:"
    for i in $(seq 0 $((${3:-4} - 1))); do
      echo "  - { address: 127.0.0.1:$((BASE_PORT + i)), name: up-$i }"
    done
  } >"$WORK/endpoints.yaml"
  local tls_args=(--secure-serving=false)
  [ "$2" = true ] && tls_args=(--cert-path "$WORK/tls")
  "$1" --bind-address 127.0.0.1 --grpc-port "$PICKER_PORT" --grpc-health-port "$EPP_HEALTH_PORT" \
    --metrics-port "$EPP_METRICS_PORT" "${tls_args[@]}" --config-file config/default-plugins.yaml \
    --endpoints-file "$WORK/endpoints.yaml" >"$WORK/epp.log" 2>&1 &
  PICKER_PID=$!
  PIDS+=($!)
  wait_http "http://127.0.0.1:$EPP_METRICS_PORT/metrics" epp
}

# The body modes the Go EPP's gateways use (and the naive picker, which echoes chunks).
DUPLEX_REQUEST='s/request_body_mode: STREAMED/request_body_mode: FULL_DUPLEX_STREAMED/'
DUPLEX_RESPONSE='s/response_body_mode: STREAMED/response_body_mode: FULL_DUPLEX_STREAMED/'

start_setup() { # setup [epp binary]
  local epp_bin=${2:-$BIN/epp}
  PICKER_PID=""
  case "$1" in
    envoy)
      { sed -n '1,/# ENDPOINTS/p' deploy/envoy/envoy-round-robin.yaml
        for i in 0 1 2 3; do
          echo "        - endpoint: { address: { socket_address: { address: 127.0.0.1, port_value: $((BASE_PORT + i)) } } }"
        done; } | local_envoy >"$WORK/envoy.yaml" ;;
    naive)
      "$EX/naive_picker" "$PICKER_PORT" "$UPSTREAMS" 2>"$WORK/naive.log" &
      PICKER_PID=$!
      PIDS+=($!)
      sed -e '/^ *# tls:begin$/,/^ *# tls:end$/d' -e "$DUPLEX_REQUEST" -e "$DUPLEX_RESPONSE" \
        deploy/envoy/envoy.yaml | local_envoy >"$WORK/envoy.yaml" ;;
    epp)
      start_epp "$epp_bin" false
      sed '/^ *# tls:begin$/,/^ *# tls:end$/d' deploy/envoy/envoy.yaml | local_envoy >"$WORK/envoy.yaml" ;;
    epp-base)
      start_epp "${BASE_EPP:?epp-base needs BASE_EPP=path to an epp binary}" false
      sed '/^ *# tls:begin$/,/^ *# tls:end$/d' deploy/envoy/envoy.yaml | local_envoy >"$WORK/envoy.yaml" ;;
    epp-16streams)
      start_epp "$epp_bin" false
      sed -e '/^ *# tls:begin$/,/^ *# tls:end$/d' \
        -e 's/http2_protocol_options: {}/http2_protocol_options: { max_concurrent_streams: 16 }/' \
        deploy/envoy/envoy.yaml | local_envoy >"$WORK/envoy.yaml" ;;
    epp-buffered)
      start_epp "$epp_bin" false
      sed -e '/^ *# tls:begin$/,/^ *# tls:end$/d' -e 's/request_body_mode: STREAMED/request_body_mode: BUFFERED/' \
        deploy/envoy/envoy.yaml | local_envoy >"$WORK/envoy.yaml" ;;
    epp-duplex)
      start_epp "$epp_bin" false
      sed -e '/^ *# tls:begin$/,/^ *# tls:end$/d' -e "$DUPLEX_REQUEST" \
        deploy/envoy/envoy.yaml | local_envoy >"$WORK/envoy.yaml" ;;
    epp-duplexresp)
      start_epp "$epp_bin" false
      sed -e '/^ *# tls:begin$/,/^ *# tls:end$/d' -e "$DUPLEX_REQUEST" -e "$DUPLEX_RESPONSE" \
        deploy/envoy/envoy.yaml | local_envoy >"$WORK/envoy.yaml" ;;
    epp-routeonly)
      start_epp "$epp_bin" false
      sed '/^ *# tls:begin$/,/^ *# tls:end$/d' deploy/envoy/envoy-route-only.yaml | local_envoy >"$WORK/envoy.yaml" ;;
    epp-tls)
      [ -d "$WORK/tls" ] || "$BIN/epp" --write-certs "$WORK/tls" >/dev/null
      start_epp "$epp_bin" true
      local_envoy deploy/envoy/envoy.yaml | sed "s|/etc/epp-tls|$WORK/tls|g" >"$WORK/envoy.yaml" ;;
    *) echo "unknown setup $1" >&2; exit 2 ;;
  esac
  start_envoy "$WORK/envoy.yaml"
}

load() { # body-bytes connections seconds sse → JSON line
  "$EX/bench_load" --url "http://127.0.0.1:$GATEWAY_PORT/v1/completions" \
    --body-bytes "$1" --connections "$2" --seconds "$3" --sse "$4"
}

RESULTS="$WORK/results.jsonl"
record() { # setup kind size sse json cpu_ticks "alloc_bytes allocations" ext_proc_msgs envoy_cpu_ticks
  python3 - "$@" "$CLK_TCK" >>"$RESULTS" <<'EOF'
import json, sys
setup, kind, size, sse, line, ticks, alloc, msgs, envoy_ticks, tck = sys.argv[1:11]
r = json.loads(line)
alloc_bytes, allocations = (float(x) for x in alloc.split()) if alloc else (None, None)
r.update(setup=setup, kind=kind, size=int(size), sse=int(sse), ext_proc_msgs=int(msgs),
         cpu_s=int(ticks) / int(tck), envoy_cpu_s=int(envoy_ticks) / int(tck),
         alloc_bytes=alloc_bytes, allocations=allocations)
print(json.dumps(r))
EOF
}

measure() { # setup kind size connections seconds sse
  local before after e0 e1 a0="" a1="" line m0 m1
  m0=$(ext_proc_msgs)
  before=$(cpu_ticks "$PICKER_PID")
  e0=$(cpu_ticks "$ENVOY_PID")
  [ "$2" = alloc ] && a0=$(alloc_stats)
  local perf_pid=""
  if [ -n "${PROFILE:-}" ] && [ -n "$PICKER_PID" ] && [ "$2" != latency ] && [ "$2" != alloc ]; then
    mkdir -p "$PROFILE"
    perf record -q -F 499 -e cpu-clock --call-graph dwarf,16384 -p "$PICKER_PID" -o "$PROFILE/$1-$3-$6.data" 2>/dev/null &
    perf_pid=$!
  fi
  local syscalls_pid=""
  if [ -n "${SYSCALLS:-}" ] && [ -n "$PICKER_PID" ] && [ "$2" != latency ] && [ "$2" != alloc ]; then
    mkdir -p "$SYSCALLS"
    perf stat -e "$SYSCALL_EVENTS" -p "$PICKER_PID" -o "$SYSCALLS/$1-$3-$6.txt" 2>/dev/null &
    syscalls_pid=$!
  fi
  line=$(load "$3" "$4" "$5" "$6")
  if [ -n "$perf_pid" ]; then kill -INT "$perf_pid"; wait "$perf_pid" || true; fi
  if [ -n "$syscalls_pid" ]; then kill -INT "$syscalls_pid"; wait "$syscalls_pid" || true; fi
  after=$(cpu_ticks "$PICKER_PID")
  e1=$(cpu_ticks "$ENVOY_PID")
  m1=$(ext_proc_msgs)
  [ "$2" = alloc ] && a1=$(alloc_stats)
  local alloc=""
  [ "$2" = alloc ] && alloc=$(python3 -c "a, b = '$a0'.split(), '$a1'.split(); print(*(float(y) - float(x) for x, y in zip(a, b)))")
  record "$1" "$2" "$3" "$6" "$line" $((after - before)) "$alloc" $((m1 - m0)) $((e1 - e0))
  echo "  $1 $2 size=$3 sse=$6: $line"
}

"$EX/bench_upstream" "$ALL_UPSTREAMS" 2>"$WORK/upstream.log" &
UPSTREAM_PID=$!
wait_http "http://127.0.0.1:$BASE_PORT/metrics" bench_upstream

for setup in $SETUPS; do
  echo "== $setup"
  start_setup "$setup"
  load 1024 4 1 0 >/dev/null # warm-up: connections, caches
  for size in $SIZES; do
    measure "$setup" throughput "$size" "$CONNECTIONS" "$SECONDS_PER_RUN" 0
    measure "$setup" latency "$size" 1 3 0
  done
  measure "$setup" sse 1024 "$CONNECTIONS" "$SECONDS_PER_RUN" "$SSE_CHUNKS"
  [ "$setup" = envoy ] || echo "  ext_proc connections Envoy opened: $(curl -s "http://127.0.0.1:$ADMIN_PORT/stats?filter=cluster.epp.upstream_cx_total" | awk '{ print $2 }')"
  stop_all
  case "$setup" in
    epp-base) ;;
    epp*)
      start_setup "$setup" target/alloc-stats/release/epp
      load 1024 4 1 0 >/dev/null
      for size in $SIZES; do measure "$setup" alloc "$size" 8 2 0; done
      measure "$setup" alloc 1024 8 2 "$SSE_CHUNKS"
      stop_all ;;
  esac
done

rss_kib() { # pid field(VmRSS|VmHWM)
  awk -v f="$2:" '$1 == f { print $2 }' "/proc/$1/status"
}

if [ "$MEMORY_SECONDS" != 0 ]; then
  echo "== memory: idle, then 4 MB prompts at 10 QPS over 10 endpoints for ${MEMORY_SECONDS}s"
  start_epp "$BIN/epp" false 10
  sed '/^ *# tls:begin$/,/^ *# tls:end$/d' deploy/envoy/envoy.yaml | local_envoy >"$WORK/envoy.yaml"
  start_envoy "$WORK/envoy.yaml"
  sleep 5
  idle=$(rss_kib "$PICKER_PID" VmRSS)
  line=$("$EX/bench_load" --url "http://127.0.0.1:$GATEWAY_PORT/v1/completions" \
    --body-bytes 4194304 --connections 10 --rate 10 --seconds "$MEMORY_SECONDS")
  echo "  $line"
  python3 - "$line" "$idle" "$(rss_kib "$PICKER_PID" VmHWM)" "$(rss_kib "$PICKER_PID" VmRSS)" \
    >>"$RESULTS" <<'EOF'
import json, sys
r = json.loads(sys.argv[1])
r.update(setup="epp", kind="memory", size=4194304, sse=0, idle_rss_kib=int(sys.argv[2]),
         peak_rss_kib=int(sys.argv[3]), end_rss_kib=int(sys.argv[4]))
print(json.dumps(r))
EOF
  stop_all
fi

mkdir -p "$OUT"
cp "$RESULTS" "$OUT/results.jsonl"
python3 scripts/bench_extproc_table.py "$OUT/results.jsonl" "$CONNECTIONS" "$SSE_CHUNKS" | tee "$OUT/table.md"
