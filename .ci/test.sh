#!/usr/bin/env bash
# Set up and run the whole test suite on a fresh machine (README command 2; .ci/run calls this).
#   system packages: mosquitto (real broker for the MQTT tests), shellcheck (deploy/install.sh),
#                    chromium + chromium-driver (tests/runtime/station drive the station page in a real browser)
#   python: .venv with rdedge[dev] (torch pinned to the local 2.14.1 wheel), then ruff, mypy, pytest
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v mosquitto >/dev/null 2>&1 || [[ -x /usr/sbin/mosquitto ]] || need+=(mosquitto)
command -v shellcheck >/dev/null 2>&1 || need+=(shellcheck)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
command -v chromium >/dev/null 2>&1 || need+=(chromium)  # headless browser for the station page tests
command -v chromedriver >/dev/null 2>&1 || need+=(chromium-driver)
if ((${#need[@]})); then
  SUDO=""; [[ $(id -u) -eq 0 ]] || SUDO="sudo"
  echo "== installing ${need[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
[[ -x .venv/bin/python ]] || "$PY" -m venv .venv
echo "== pip install -e .[dev]"
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[dev]'

export PATH="$PWD/.venv/bin:$PATH"
echo "== ruff"
ruff check .
ruff format --check .
echo "== mypy (runtime/)"
mypy
echo "== pytest"
python -m pytest -q -p no:cacheprovider "$@"
