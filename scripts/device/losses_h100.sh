#!/usr/bin/env bash
# The fused loss at the seed size on one CUDA device (H100 or H200), about 5 minutes:
#   1. the tiled lm-head pass on CUDA against the float64 reference (tests/gpu/test_losses_tiled_cuda.py:
#      float32 for every divergence and support, bf16 within its derived rounding bound; it also shows
#      whether torch.mm(..., out_dtype=torch.float32) exists there);
#   2. opd bench losses at N = 4096, V = 151,936, H = 1024, bf16, reverse KL, full teacher: the seed
#      method, the fused loss with its default settings and the fused loss with the tiled schedule
#      (loss.chunking=tiles), median of 20 CUDA-event timings each, peak memory from
#      torch.cuda.max_memory_allocated; one `ratio` line per fused method (memory and time vs the seed);
#   3. (if time is left) the tiled schedule with larger tiles (8192 wide, 128 MiB).
# Targets: >= 12x less peak extra memory than the seed method and <= 1.0x its time, default settings.
# Run from the repository root: `bash scripts/device/losses_h100.sh`, e.g. through the device tool as
#   run(command="bash scripts/device/losses_h100.sh", timeout_s=420, carry=[".whl"])
# (420 s of the 15-minute budget leaves time to rerun once). Logs go to $OUT or ./device-out. Needs python3
# with torch (CUDA) and pytest; pydantic is installed from .whl/ (wheels carried from the build machine) when
# missing.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT_DIR="${OUT:-device-out}"
mkdir -p "$OUT_DIR"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-/tmp/opd-inductor}"
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
import torch, pydantic
assert torch.cuda.is_available(), "no CUDA device"
import opd_apps.bench.losses, student_trainer.loss.tiled  # noqa: F401
a = torch.ones(8, 8, device="cuda", dtype=torch.bfloat16)
try:
    out = torch.mm(a, a, out_dtype=torch.float32).dtype
except Exception as exc:  # the tiled pass then falls back to bf16 logits
    out = f"missing ({type(exc).__name__})"
print(f"torch {torch.__version__}, pydantic {pydantic.__version__}, {torch.cuda.get_device_name()}, "
      f"mm out_dtype float32: {out}")
EOF

run() {  # run NAME LIMIT_S COMMAND...: output to the console and to $OUT_DIR/NAME.log
  local name=$1 limit=$2; shift 2
  echo "== [$(( $(date +%s) - START )) s] $name: $*"
  timeout "$limit" "$@" 2>&1 | tee "$OUT_DIR/$name.log"
  echo "== $name: exit ${PIPESTATUS[0]}"
}

run tiled_tests 100 "$PY" -m pytest -q -p no:cacheprovider tests/gpu/test_losses_tiled_cuda.py
run losses_4096_bf16 200 "$PY" -m opd bench losses --device cuda --dtype bfloat16 --losses rkl --n 4096 \
  --v 151936 --methods seed fused fused_tiled --memory-cap-gib 60 --repeats 20 --timeout-s 90
if (( $(date +%s) - START < 280 )); then
  run losses_4096_bf16_tiles8192 90 "$PY" -m opd bench losses --device cuda --dtype bfloat16 --losses rkl \
    --n 4096 --v 151936 --methods seed fused_tiled --tile-vocab 8192 --tile-budget-mib 128 --memory-cap-gib 60 \
    --repeats 20 --timeout-s 80
fi
grep -h "^ratio" "$OUT_DIR"/losses_*.log
echo "== done in $(( $(date +%s) - START )) s; logs in $OUT_DIR"
