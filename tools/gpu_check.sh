#!/usr/bin/env bash
# Issue 23's checks on a CUDA machine, in one go (time limits per step add up to 9m20s):
#   1. the CUDA-marked tests of the ranking losses and the benchmark (sync debug mode, CUDA
#      graph capture, CPU/CUDA agreement, autocast + GradScaler, the benchmark on CUDA);
#   2. the loss benchmark on CUDA at 32,736 anchors/image x {1, 8} images x {20, 80} classes x
#      {100, 2000} positives: AP-/AUC-loss (sorted kernel, the CUDA default) and AP-loss with
#      the grid kernel forced, against focal loss masked (as RetinaNet calls it) and over all
#      entries, with host synchronisations counted by torch.cuda.set_sync_debug_mode;
#   3. the paper's Fig. 10: one training iteration of
#      configs/VOC-Detection/retinanet_R_50_FPN_160e_voc0712_ap.yaml (random init, 8 images
#      512x512) cut into parts, with AP-loss and with focal loss.
#
# Usage: bash tools/gpu_check.sh            (results in $OUT, else output/gpu_check)
#        bash tools/gpu_check.sh --smoke    (CPU, tiny sizes: checks that the script runs)
# Python: $PYTHON, else .venv/bin/python when present, else python3. Each step has its own time
# limit, so a 10-minute window is enough; a failing step is reported and the others still run.
set -u
cd "$(dirname "$0")/.."
RESULTS="${OUT:-output/gpu_check}"
mkdir -p "$RESULTS"
if [ -n "${PYTHON:-}" ]; then PY="$PYTHON"
elif [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=python3; fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if [ "${1:-}" = "--smoke" ]; then
  DEVICE=cpu
  BENCH_SIZES=(--images 1 2 --anchors 600 --classes 4 --positives 12 --repeats 2 --warmup 1
               --no-memory)
  BREAKDOWN_SIZES=(--images 1 --size 128 --iters 1 --warmup 0)
  TEST_SELECTION=(tests/test_ranking_kernels.py -m "not cuda and not slow")
else
  DEVICE=cuda
  BENCH_SIZES=(--images 1 8 --anchors 32736 --classes 20 80 --positives 100 2000 --repeats 10
               --warmup 2)
  BREAKDOWN_SIZES=(--images 8 --size 512 --iters 5 --warmup 2)
  TEST_SELECTION=(tests/test_ranking_kernels.py tests/test_losses.py tests/test_loss_amp.py
                  tests/test_amp.py tests/test_benchmark.py -m cuda)
fi

status=0
step() {  # step NAME LIMIT_S COMMAND...: run with a time limit, log to $RESULTS/NAME.log
  local name=$1 limit=$2; shift 2
  echo "[gpu_check] $(date +%T) $name (limit ${limit}s)"
  timeout "$limit" "$@" > "$RESULTS/$name.log" 2>&1
  local rc=$?
  echo "[gpu_check] $(date +%T) $name: exit status $rc"
  tail -n 25 "$RESULTS/$name.log"
  [ $rc -eq 0 ] || status=1
}

{
  echo "date: $(date -u)"; echo "host: $(hostname)"; uptime
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 || true
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda,
  torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA device')" 2>&1
} | tee "$RESULTS/machine.txt"

step tests 200 "$PY" -m pytest -q -p no:cacheprovider -rs "${TEST_SELECTION[@]}"
step benchmark 200 "$PY" -m tools.benchmark --device "$DEVICE" "${BENCH_SIZES[@]}" \
  --losses ap_loss auc_loss ap_loss_grid --output-dir "$RESULTS/benchmark"
step breakdown_ap 80 "$PY" -m tools.benchmark --breakdown --device "$DEVICE" \
  "${BREAKDOWN_SIZES[@]}" --output-dir "$RESULTS/breakdown_ap"
step breakdown_focal 80 "$PY" -m tools.benchmark --breakdown --device "$DEVICE" \
  "${BREAKDOWN_SIZES[@]}" --cls-loss focal --output-dir "$RESULTS/breakdown_focal"

echo "[gpu_check] results in $RESULTS (exit status $status)"
exit $status
