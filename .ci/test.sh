#!/usr/bin/env bash
# Set up and run the whole test suite on a fresh machine (README command 2; .ci/run calls this).
#   system packages: mosquitto (real broker for the MQTT tests), shellcheck (deploy/install.sh),
#                    chromium + chromium-driver (tests/runtime/station drive the station page in a real browser)
#                    gir1.2-aravis-0.8 + python3-gi + aravis-tools (GenICam source, fake GigE camera)
#   python: .venv with rdedge[dev] (torch pinned to the local 2.14.1 wheel), then ruff, mypy, pytest
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v mosquitto >/dev/null 2>&1 || [[ -x /usr/sbin/mosquitto ]] || need+=(mosquitto)
command -v shellcheck >/dev/null 2>&1 || need+=(shellcheck)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
command -v chromium >/dev/null 2>&1 || need+=(chromium)  # headless browser for the station page tests
command -v chromedriver >/dev/null 2>&1 || need+=(chromium-driver)
# GenICam (tests/runtime/sources): Aravis' typelib, PyGObject, and the fake GigE Vision camera (in aravis-tools)
ls /usr/lib/*/girepository-1.0/Aravis-0.8.typelib >/dev/null 2>&1 || need+=(gir1.2-aravis-0.8)
[[ -d /usr/lib/python3/dist-packages/gi ]] || need+=(python3-gi)
# Debian ships arv-fake-gv-camera-0.8 in aravis-tools (bookworm) and the other command-line tools in aravis-tools-cli
command -v arv-fake-gv-camera-0.8 >/dev/null 2>&1 || need+=(aravis-tools aravis-tools-cli)
if ((${#need[@]})); then
  SUDO=""; [[ $(id -u) -eq 0 ]] || SUDO="sudo"
  echo "== installing ${need[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
if [[ -n ${CI:-} ]] && ! command -v arv-fake-gv-camera-0.8 >/dev/null 2>&1; then
  echo "CI: arv-fake-gv-camera-0.8 is still missing after apt-get (the GenICam tests would only skip)" >&2
  exit 1
fi

PY=${PYTHON:-python3}
[[ -x .venv/bin/python ]] || "$PY" -m venv .venv
echo "== pip install -e .[dev]"
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[dev]'
# PyGObject comes from Debian (no wheel without a compiler): link just its gi package into the venv
site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
if [[ -d /usr/lib/python3/dist-packages/gi && ! -e "$site/gi" ]]; then
  ln -s /usr/lib/python3/dist-packages/gi "$site/gi"
fi

export PATH="$PWD/.venv/bin:$PATH"
echo "== ruff"
ruff check .
ruff format --check .
echo "== mypy (runtime/)"
mypy
echo "== pytest"
python -m pytest -q -p no:cacheprovider "$@"
