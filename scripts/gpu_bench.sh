#!/usr/bin/env bash
# GPU measurements of the trainer at scale on one CUDA device, about six minutes on an H100:
#   1. opd bench losses at N = 4096, V = 151,936, H = 1024 (the issue's target size): the seed method,
#      the fused loss (compiled block math), the fused loss eager, the fused loss on a top-k teacher;
#      median of 20 CUDA-event timings, peak memory from torch.cuda.max_memory_allocated, ratios vs the seed
#   2. opd bench trainer --micro-batch-tokens 2048,8192,32768,100000: the mask path vs packed SDPA
#   3. opd bench losses for JSD at N = 4096 (the other size where the seed method takes >= 50 ms on an H100)
#   4. (if time is left) the CUDA scale tests (tests/gpu/test_trainer_scale_cuda.py)
# Run from the repository root: `bash scripts/gpu_bench.sh`. Logs go to $OUT (the device tool's folder) or
# ./gpu-bench-out. Needs python3 with torch (CUDA), transformers, numpy, msgpack, pyyaml; pydantic and its
# dependencies are installed from .whl/ (wheels carried from the build machine) when missing.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-gpu-bench-out}"
mkdir -p "$OUT_DIR"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-/tmp/opd-inductor}"  # shared by the bench workers
START=$(date +%s)

if ! "$PY" -c "import pydantic" 2>/dev/null; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      && export PYTHONPATH="/tmp/site:$PYTHONPATH" || { echo "installing .whl/ failed"; exit 1; }
  else
    echo "pydantic is missing and there is no .whl/ folder of wheels to install it from"; exit 1
  fi
fi
"$PY" - <<'EOF' || exit 1
import torch, transformers, pydantic
assert torch.cuda.is_available(), "no CUDA device"
import opd_apps.bench.losses, opd_apps.bench.trainer_step, student_trainer.model  # no Redis/gRPC/HTTP imports
print(f"torch {torch.__version__}, transformers {transformers.__version__}, pydantic {pydantic.__version__}, "
      f"{torch.cuda.get_device_name()}")
EOF
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT_DIR/gpu.txt"

run() {  # run NAME LIMIT_S COMMAND...: output to the console and to $OUT_DIR/NAME.log
  local name=$1 limit=$2; shift 2
  echo "== [$(( $(date +%s) - START )) s] $name: $*"
  timeout "$limit" "$@" 2>&1 | tee "$OUT_DIR/$name.log"
  echo "== $name: exit ${PIPESTATUS[0]}"
}

run losses_4096_rkl 170 "$PY" -m opd bench losses --device cuda --losses rkl --n 4096 --v 151936 \
  --methods seed fused fused_eager fused_topk --memory-cap-gib 60 --repeats 20 --timeout-s 150
run trainer_micro_batches 130 "$PY" -m opd bench trainer --device cuda \
  --micro-batch-tokens 2048,8192,32768,100000 --step-timeout-s 110
run losses_4096_jsd 110 "$PY" -m opd bench losses --device cuda --losses jsd --n 4096 --v 151936 \
  --methods seed fused fused_topk --memory-cap-gib 60 --repeats 20 --timeout-s 100
if (( $(date +%s) - START < 330 )); then
  run gpu_tests 110 "$PY" -m pytest -q -p no:cacheprovider -x tests/gpu/test_trainer_scale_cuda.py
fi
echo "== done in $(( $(date +%s) - START )) s; logs in $OUT_DIR"
