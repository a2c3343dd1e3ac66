#!/usr/bin/env bash
# Everything a lent GPU machine should check, in one short call (issue 11, "GPU path"):
#
#   bash benchmarks/gpu_check.sh              # tests, then every benchmark row (a few min)
#   bash benchmarks/gpu_check.sh --quick      # tests, then a smoke benchmark
#   bash benchmarks/gpu_check.sh --only step  # any bench_conv.py option but --baseline,
#                                             # --one-thread-passes (CPU only) and --output
#
# 1. CuPy and threadpoolctl: the ones installed, else the gpu and bench extras
#    (pip install -e ".[gpu,bench]"); PyTorch with CUDA is the comparison (never a
#    dependency of minidl).
# 2. tests/test_gpu.py (marker gpu): on a GPU they must pass, none may skip.
# 3. benchmarks/bench_conv.py --device gpu: Conv2D, MaxPool2D and training steps,
#    minidl on cupy against torch on CUDA (arguments go to it).
# It prints one table: the tests' result, then the benchmark's rows. The exit status
# is non-zero when a test failed or skipped, or the benchmark failed.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}

# No device, nothing to do: stop before installing anything on this machine.
nvidia-smi -L >/dev/null 2>&1 || { echo "gpu_check: no NVIDIA GPU here (nvidia-smi)" >&2; exit 1; }
if ! "$PY" -c "import cupy, threadpoolctl" 2>/dev/null; then
    echo "gpu_check: installing the gpu and bench extras" >&2
    "$PY" -m pip install -q -e ".[gpu,bench]" >&2 || {
        echo "gpu_check: CuPy or threadpoolctl is missing and the extras did not install" >&2; exit 1; }
fi
"$PY" -c "import minidl, sys; minidl.gpu_available() or sys.exit('gpu_check: no CUDA device answers')" || exit 1
"$PY" -c "import torch, sys; torch.cuda.is_available() or sys.exit('gpu_check: torch sees no CUDA device')" || exit 1

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$PY" -m pytest -q -m gpu -rs -p no:cacheprovider tests/test_gpu.py >"$work/tests.log" 2>&1
tests_rc=$?
cat "$work/tests.log" >&2
tests=$(grep -E "[0-9]+ (passed|failed|skipped|error)" "$work/tests.log" | tail -n 1)
if grep -qE "[0-9]+ skipped" <<<"$tests"; then tests_rc=${tests_rc/#0/1}; fi

"$PY" benchmarks/bench_conv.py --device gpu "$@" --output "$work/bench.md" >&2
bench_rc=$?

gpu=$("$PY" -c "import cupy; print(cupy.cuda.runtime.getDeviceProperties(0)['name'].decode())")
echo
echo "## minidl GPU check, $(date -u +%Y-%m-%d), $gpu"
echo
echo "tests/test_gpu.py: ${tests:-no result} (exit $tests_rc)"
echo
if [ "$bench_rc" -eq 0 ]; then cat "$work/bench.md"; else echo "benchmark failed (exit $bench_rc)"; fi
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
