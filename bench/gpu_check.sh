#!/usr/bin/env bash
# The one script for a device call (see /work/.library/device/METHOD.md in the dev workplace):
# builds int4kit from this working tree against the device image's own torch, runs the CUDA tests
# and the GPU benchmark, and writes every log under $OUT; the last lines printed are a summary.
#
#   run: bash bench/gpu_check.sh        (on the device machine; OUT is set by the device tool)
#
# Budget: under 8 minutes on 16 cores even when every stage hits its timeout (build <= 150 s,
# CUDA tests <= 110 s, benchmark <= 140 s, tile sweep <= 60 s); each stage has its own timeout.
# $OUT gets at most 8 files (the device tool returns at most 8): env (with ptxas' register and
# spill lines), build, cuda_tests, bench, tile_sweep logs, bench_cuda.json, bench_cuda.md and,
# on a device with several GPUs, tp (tensor parallelism over NCCL, bench/tp_check.py).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
PY=${PY:-python3}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export INT4KIT_CUDA=1                                   # fail loudly if CUDA cannot be built
export INT4KIT_CUDA_ARCHS=${INT4KIT_CUDA_ARCHS:-9.0a}   # the H200; CI builds every arch
export MAX_JOBS=${MAX_JOBS:-16}
summary=()

stage() {  # stage NAME TIMEOUT_S COMMAND...: runs COMMAND with its output in $OUT/NAME.log
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  summary+=("$(printf '%-10s rc=%-3s %4ss  %s' "$name" "$rc" "$((SECONDS - start))" "$(tail -n 1 "$OUT/$name.log")")")
  return $rc
}

{
  nvidia-smi
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
  "$CUDA_HOME/bin/nvcc" --version | tail -n 2
} > "$OUT/env.log" 2>&1

# build in place (no pip: the image has no network); the .so lands in python/int4kit
if stage build 150 "$PY" setup.py build_clib build_ext --inplace; then
  export PYTHONPATH=$PWD/python
  { echo "== ptxas"; grep -h "registers\|spill" "$OUT/build.log"; } >> "$OUT/env.log" || true
  # no -x: a first run on a device should show every failure at once; pytest-xdist (in the
  # device image) spreads the CPU-side references and torch.compile runs over the cores
  xdist=$("$PY" -c "import xdist" 2>/dev/null && echo "-n 8" || true)
  stage cuda_tests 110 "$PY" -m pytest -q -rs $xdist tests/test_cuda.py
  grep -E "^FAILED|^ERROR" "$OUT/cuda_tests.log" | head -n 30
  stage bench 140 "$PY" bench/bench_linear.py --device cuda --json "$OUT/bench_cuda.json" \
    --markdown "$OUT/bench_cuda.md"
  tail -n 25 "$OUT/bench.log"
  # the fused kernel under each tile shape, to check the choice by M (docs/CUDA.md)
  stage tile_sweep 60 "$PY" bench/bench_linear_cuda.py --tile-sweep
  tail -n 16 "$OUT/tile_sweep.log"
  gpus=$(nvidia-smi -L 2>/dev/null | wc -l)
  if [ "$gpus" -ge 2 ]; then  # int4kit.parallel on NCCL (docs/SCALE.md)
    stage tp 90 "$PY" -m torch.distributed.run --nproc_per_node=2 bench/tp_check.py
    tail -n 5 "$OUT/tp.log"
  fi
fi

echo
echo "== gpu_check summary (logs in $OUT) =="
printf '%s\n' "${summary[@]}"
