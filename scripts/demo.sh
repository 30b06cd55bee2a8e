#!/usr/bin/env bash
# The demo: 4 simulated vLLM pods + epp + real Envoy, the high-reuse shared-prefix workload
# for about a minute (once through epp, once through Envoy round-robin), then the table and
# the plot. Installs what it needs; stops everything it started.
set -euo pipefail
cd "$(dirname "$0")/.."
PODS=4 RATE=${RATE:-8} REQUESTS=${REQUESTS:-256} PREFIX_GROUPS=64 PROMPTS_PER_GROUP=4 \
  WORKLOAD=high OUT=${OUT:-bench-results/demo} exec scripts/bench_e2e.sh
