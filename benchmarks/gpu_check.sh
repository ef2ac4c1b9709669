#!/usr/bin/env bash
# The GPU device check (issue #15): on a machine with an NVIDIA GPU, install the gpu extra,
# run the GPU tests, then `python -m benchmarks.gpu --json OUT/gpu.json`. One prepared script,
# no network needed, about 10 minutes at most (the benchmark keeps to --budget-s, 420 s).
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]          # default OUT_DIR: out/gpu
#   bash benchmarks/gpu_check.sh download [CUDA]    # beforehand, on a machine with network:
#                                                   # wheels into wheels/gpu-cuCUDA (CUDA 12 or 13)
#
# What it installs from, in this order (the first that works):
#   1. an environment that already has everything (QALLOC_GPU_PYTHON, or .venv-gpu from a
#      previous run, or the system python: `import ray_qalloc, cuquantum, cupy, pynvml` works);
#   2. wheels downloaded beforehand (`download` above) in wheels/gpu-cu12 or wheels/gpu-cu13
#      (QALLOC_GPU_WHEELS overrides): a venv .venv-gpu that also sees the system's packages,
#      then `pip install --no-index --find-links` of requirements.lock, this package and the
#      gpu extra — nothing is fetched;
#   3. otherwise it stops and says what to provide (exit 4).
# Exit codes: 0 checks and benchmark passed; 1 a check failed; 3 no GPU; 4 nothing to install from.
set -uo pipefail
cd "$(dirname "$0")/.."

cuda_major() {   # the CUDA major the driver supports (nvidia-smi's header), 12 if unknown
    local v
    v=$(nvidia-smi 2>/dev/null | sed -n 's/.*CUDA Version: \([0-9]*\).*/\1/p' | head -1)
    if [ -n "$v" ] && [ "$v" -ge 13 ]; then echo 13; else echo 12; fi
}

if [ "${1:-}" = "download" ]; then
    CUDA=${2:-12}
    DEST=${QALLOC_GPU_WHEELS:-wheels/gpu-cu$CUDA}
    EXTRA=gpu; [ "$CUDA" = 13 ] && EXTRA=gpu-cu13
    mkdir -p "$DEST"
    PIP="python3 -m pip download --dest $DEST --only-binary=:all: --python-version 3.11 --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64"
    $PIP -r requirements.lock && \
    $PIP ".[$EXTRA]" "pytest>=9" "pytest-timeout>=2.4" && \
    python3 -m pip wheel --no-deps --wheel-dir "$DEST" . && \
    echo "wheels in $DEST ($(du -sh "$DEST" | cut -f1)); copy the repository with it to the GPU node"
    exit $?
fi

OUT=${1:-out/gpu}
mkdir -p "$OUT"
if ! nvidia-smi -L >/dev/null 2>&1; then
    echo "gpu_check: no NVIDIA GPU here (nvidia-smi found none); nothing to check." >&2
    exit 3
fi
nvidia-smi -L
CUDA=$(cuda_major)
EXTRA=gpu; [ "$CUDA" = 13 ] && EXTRA=gpu-cu13
WHEELS=${QALLOC_GPU_WHEELS:-wheels/gpu-cu$CUDA}
ready() { "$1" -c 'import ray_qalloc, cuquantum, cupy, pynvml, pytest' >/dev/null 2>&1; }

PY=""
for candidate in "${QALLOC_GPU_PYTHON:-}" .venv-gpu/bin/python python3; do
    [ -n "$candidate" ] && command -v "$candidate" >/dev/null 2>&1 || continue
    if PYTHONPATH=. ready "$candidate"; then PY=$candidate; break; fi
done
if [ -z "$PY" ]; then
    if [ ! -d "$WHEELS" ]; then
        echo "gpu_check: the gpu extra is not installed and there are no wheels in $WHEELS." >&2
        echo "To fix: on a machine with network, 'bash benchmarks/gpu_check.sh download $CUDA' and copy" >&2
        echo "wheels/ with the repository; or preinstall: pip install -r requirements.lock '.[${EXTRA}]' pytest pytest-timeout" >&2
        exit 4
    fi
    [ -x .venv-gpu/bin/python ] || python3 -m venv --system-site-packages .venv-gpu || exit 4
    PIP=".venv-gpu/bin/python -m pip install --quiet --disable-pip-version-check --no-index --find-links $WHEELS"
    $PIP -r requirements.lock && $PIP --no-deps . && $PIP ".[$EXTRA]" pytest pytest-timeout || exit 4
    PY=.venv-gpu/bin/python
fi
echo "gpu_check: python $PY, CUDA $CUDA, extra $EXTRA"
"$PY" -c 'import sys; from ray_qalloc.backends.gpu_probe import default_probe as p; d=p().devices(); e=p().engines(); print("devices:", [(x.name, round(x.memory_total_bytes/2**30)) for x in d], "engines:", sorted(e)); sys.exit(0 if d else 3)' || exit 3

rc=0
timeout 150 "$PY" -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$OUT/tests.txt" || rc=1
timeout 450 "$PY" -m benchmarks.gpu --json "$OUT/gpu.json" --budget-s 400 2>&1 | tee "$OUT/benchmark.txt"
bench=${PIPESTATUS[0]}
[ "$bench" = 0 ] || rc=1
echo "gpu_check: tests $([ -s "$OUT/tests.txt" ] && tail -1 "$OUT/tests.txt"), benchmark exit $bench -> $OUT"
exit $rc
