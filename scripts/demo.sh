#!/usr/bin/env bash
# The demo: 4 simulated vLLM pods (late metrics, their own tokenizer) behind
#   Envoy + epp, sglang-router cache_aware (a real peer), and Envoy round-robin,
# each in turn with fresh pods, on the trial's high-reuse workload (16 system prompts of 3,000
# tokens, 128-token questions, 16 req/s, 480 requests: ~30 s per system), then the table and
# the pictures. Installs what it needs; stops everything it started.
set -euo pipefail
cd "$(dirname "$0")/.."
SYSTEMS=${SYSTEMS:-"epp sglang round-robin"} PODS=4 RATE=${RATE:-16} REQUESTS=${REQUESTS:-480} \
  PREFIX_GROUPS=16 PROMPTS_PER_GROUP=30 WORKLOAD=high OUT=${OUT:-bench-results/demo} \
  exec scripts/bench_e2e.sh
