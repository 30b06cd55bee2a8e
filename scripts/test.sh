#!/usr/bin/env bash
# The test command (README, .ci/run): set-up, formatting, lints, then every test
# (unit tests and the end-to-end tests through a real Envoy).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo fmt --all -- --check
cargo clippy --all-targets --locked -- -D warnings
cargo nextest run --locked --all-targets --no-fail-fast
# A 2-minute soak through real processes (RELIABILITY.md records the 30-minute run).
SECONDS_TOTAL=120 OUT=bench-results/soak-ci scripts/soak.sh
