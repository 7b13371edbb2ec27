#!/usr/bin/env bash
# One GPU session on a lent device machine: install onnxruntime-gpu from carried parts, check the
# carried library's SASS, run the cuda tests, run the benchmark. Results under $OUT; a short table last.
#
# Expects (carried from the build machine):
#   .gpubuild/libtoptheta_ops.so   the library built with CUDA (x86-64, nvcc 13)
#   .whl/*.whl                     pytest and its dependencies, used only if pytest is missing
#   onnxruntime-gpu: /root/ortgpu already installed, or the wheel's parts in /root/ortgpu-parts/part.*
#                    plus the last part(s) in .ortgpu/p*/part.* (sha256 in ORTGPU_SHA256)
# Usage: bash bench/gpu_session.sh [STEPS] [bench args...]   STEPS: comma list of tests, bench, profile
#        (default tests,bench; "all" = tests,bench)
set -uo pipefail
what=${1:-all}
shift || true
[ "$what" = all ] && what=tests,bench
has() { [[ ",$what," == *",$1,"* ]]; }
OUT=${OUT:-/tmp/toptheta-out}
mkdir -p "$OUT"
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
export PYTHONUNBUFFERED=1
LIB="$ROOT/.gpubuild/libtoptheta_ops.so"

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"

if [ ! -d /root/ortgpu/onnxruntime ] && ls /root/ortgpu-parts/part.* .ortgpu/p*/part.* >/dev/null 2>&1; then
  whl=/tmp/onnxruntime_gpu-1.31.1-cp312-cp312-manylinux_2_28_x86_64.whl
  mkdir -p /root/ortgpu-parts
  cp .ortgpu/p*/part.* /root/ortgpu-parts/ 2>/dev/null
  cat $(ls /root/ortgpu-parts/part.* | sort -V) > "$whl"
  got=$(sha256sum "$whl" | cut -d' ' -f1)
  if [ -n "${ORTGPU_SHA256:-}" ] && [ "$got" != "$ORTGPU_SHA256" ]; then
    echo "onnxruntime-gpu wheel sha256 mismatch: $got" >&2
  else
    python3 -m pip install -q --no-deps --no-compile --target /root/ortgpu "$whl" && echo "onnxruntime-gpu installed"
  fi
fi
export PYTHONPATH="/root/ortgpu:$ROOT"
if ! python3 -c "import pytest" 2>/dev/null; then
  python3 -m pip install -q --no-deps --no-compile --target /tmp/pyt .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/pyt"
fi
export TOPTHETA_OPS_LIBRARY="$LIB"
python3 -c "import torch, onnxruntime as o; o.preload_dlls() if hasattr(o, 'preload_dlls') else None; \
print('ort', o.__version__, o.get_available_providers())" 2>&1 | tail -1 | tee "$OUT/ort.txt"

if command -v cuobjdump >/dev/null; then
  cuobjdump -sass "$LIB" > /tmp/sass.txt 2>&1
  { echo "HMMA: $(grep -c HMMA /tmp/sass.txt)  LDSM: $(grep -c LDSM /tmp/sass.txt)  LDGSTS: $(grep -c LDGSTS /tmp/sass.txt)" \
         "local mem (LDL/STL): $(grep -cE 'LDL|STL' /tmp/sass.txt)"; } | tee "$OUT/sass.txt"
fi

rc_tests=0
if has tests; then
  timeout 240 python3 -m pytest tests/test_cuda.py -q -rfEs -p no:cacheprovider ${PYTEST_ARGS:-} 2>&1 \
    | tee "$OUT/pytest.log"
  rc_tests=${PIPESTATUS[0]}
fi
if has bench; then
  timeout 320 python3 bench/attention_bench.py --library "$LIB" --out "$OUT" "$@" 2>&1 | tee "$OUT/bench.log"
fi
if has profile; then
  NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
  timeout 300 "$NCU" --target-processes all -k "regex:PrefillKernel|flash_fwd|DecodeKernel|CombineKernel" \
    --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
    --section SchedulerStats --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis -c 10 \
    python3 bench/profile_kernels.py "$LIB" > "$OUT/ncu.txt" 2>&1
  grep -E "PrefillKernel|flash_fwd|DecodeKernel|CombineKernel|Duration|Achieved Occupancy|Block Limit|Compute \(SM\) Throughput|Memory Throughput|Issue Slots Busy|No Eligible|Theoretical Occupancy|Registers Per|Stall|Waves Per SM" \
    "$OUT/ncu.txt" | cut -c1-150 | head -150
fi
echo "== summary =="
[ -f "$OUT/pytest.log" ] && tail -1 "$OUT/pytest.log"
[ -f "$OUT/bench.log" ] && sed -n '/== speedup/,$p' "$OUT/bench.log"
exit $rc_tests
