#!/usr/bin/env bash
# Issue 15's GPU figures in one command on a lent GPU machine (H100/H200), well under 10 minutes:
#
#   OUT=/some/dir benchmarks/gpu_run.sh
#
# Results (7 files): gpu_run.log (steps, pip, nvidia-smi, pip list), gpu_tests.{log,xml}, gpu_bench.{json,log},
# gpu_bench_ort_cuda.{json,log}.
#
# 1. Python packages: whatever imports already is used; otherwise wheels from ./.whl (if the folder exists: an
#    offline machine) or from the package index. TensorRT, cuda-python and onnxruntime-gpu are pinned below; override
#    with TRT_SPEC / CUDA_PYTHON_SPEC / ORT_GPU_SPEC. onnxruntime-gpu goes into its own folder (/tmp/ortgpu) so the
#    CPU onnxruntime the tests compare against stays as it is.
# 2. pytest -m gpu (tests/runtime/test_tensorrt_gpu.py, tests/export/test_tensorrt_gpu.py).
# 3. benchmarks/gpu_bench.py: engines for a 256 px bundle (fp16, fp32), per-part and chained GPU latency at batch 1
#    from CUDA events with and without CUDA graphs, FP16 vs FP32 vs ORT score deviation, build time, then the ORT
#    CUDA provider figures in a second process.
# Each step has its own time limit and failures do not stop the next step (no `set -e`): what ran is in $OUT.
set -u
BUDGET_S=${BUDGET_S:-570}  # the whole script; each step gets min(its cap, what is left)
left() { local l=$((BUDGET_S - SECONDS)); echo $((l < 5 ? 5 : l)); }
cap() { local l; l=$(left); echo $(($1 < l ? $1 : l)); }
OUT=${OUT:?set OUT to a folder for the results}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
say() { printf '[gpu_run %s] %s\n' "$(date -u +%H:%M:%S)" "$*" | tee -a "$OUT/gpu_run.log"; }

# CUDA major of the driver decides the cuda-python / TensorRT wheels (cu13 wheels need a CUDA 13 driver).
CUDA_MAJOR=$(nvidia-smi 2>/dev/null | sed -n 's/.*CUDA Version: *\([0-9]*\).*/\1/p' | head -1)
CUDA_MAJOR=${CUDA_MAJOR:-12}
if [[ $CUDA_MAJOR -ge 13 ]]; then
  TRT_SPEC=${TRT_SPEC:-tensorrt-cu13==11.4.*}
  CUDA_PYTHON_SPEC=${CUDA_PYTHON_SPEC:-cuda-python>=13,<14}
else
  TRT_SPEC=${TRT_SPEC:-tensorrt-cu12==10.13.*}
  CUDA_PYTHON_SPEC=${CUDA_PYTHON_SPEC:-cuda-python>=12.3,<13}
fi
ORT_GPU_SPEC=${ORT_GPU_SPEC:-onnxruntime-gpu[cuda,cudnn]>=1.20}
say "driver CUDA $CUDA_MAJOR; python $($PY -V 2>&1)"
LOG="$OUT/gpu_run.log"  # pip output, nvidia-smi and pip list go here too (8 files at most come back)
nvidia-smi >>"$LOG" 2>&1

PIP=("$PY" -m pip install -q --no-cache-dir --disable-pip-version-check --retries 1 --timeout 15)
if [[ -d .whl ]]; then
  say "installing the wheels in .whl into /tmp/site (offline)"
  timeout "$(cap 120)" "${PIP[@]}" --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl >>"$LOG" 2>&1 ||
    say "wheel install failed (see above)"
  export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
need() {  # need MODULE SPEC: install SPEC unless MODULE imports
  if "$PY" -c "import $1" 2>/dev/null; then say "$1: present"; return; fi
  say "$1: installing $2"
  timeout "$(cap 150)" "${PIP[@]}" "$2" >>"$LOG" 2>&1 || say "$1: install of $2 failed (see above)"
}
need pydantic 'pydantic>=2.5'
need paho 'paho-mqtt>=2.0'
need yaml 'pyyaml>=6.0'
need cv2 'opencv-python-headless>=4.8'
need onnxruntime 'onnxruntime>=1.17'
need cuda.bindings.runtime "$CUDA_PYTHON_SPEC"
need tensorrt "$TRT_SPEC"
if ! PYTHONPATH="/tmp/ortgpu:$PYTHONPATH" "$PY" -c \
  'import onnxruntime as o, sys; sys.exit("CUDAExecutionProvider" not in o.get_available_providers())' 2>/dev/null; then
  say "onnxruntime-gpu: installing $ORT_GPU_SPEC into /tmp/ortgpu"
  timeout "$(cap 150)" "${PIP[@]}" --target /tmp/ortgpu "$ORT_GPU_SPEC" >>"$LOG" 2>&1 || say "onnxruntime-gpu install failed"
fi
"$PY" -m pip list 2>/dev/null | grep -iE '^(tensorrt|cuda|onnx|torch|numpy|pydantic|opencv)' >>"$LOG"

say "pytest -m gpu"
timeout "$(cap 200)" "$PY" -m pytest -m gpu -q -p no:cacheprovider -o addopts="" -rs \
  --junitxml="$OUT/gpu_tests.xml" tests/runtime/test_tensorrt_gpu.py tests/export/test_tensorrt_gpu.py \
  >"$OUT/gpu_tests.log" 2>&1
say "pytest exit $? ($(tail -1 "$OUT/gpu_tests.log"))"

WORK=/tmp/rdedge-gpu-bench
say "gpu_bench (TensorRT sections)"
timeout "$(cap 300)" "$PY" benchmarks/gpu_bench.py --out "$OUT" --work "$WORK" >"$OUT/gpu_bench.log" 2>&1
say "gpu_bench exit $?"
if [[ -f $WORK/bundle/manifest.json ]]; then
  say "gpu_bench (ONNX Runtime CUDA provider)"
  PYTHONPATH="/tmp/ortgpu:$PYTHONPATH" timeout "$(cap 90)" "$PY" benchmarks/gpu_bench.py --out "$OUT" --work "$WORK" \
    --bundle "$WORK/bundle" --only ort_cuda >"$OUT/gpu_bench_ort_cuda.log" 2>&1
  say "ort_cuda exit $?"
fi
say "done in ${SECONDS} s: $(ls "$OUT" | tr '\n' ' ')"
