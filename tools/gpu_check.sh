#!/usr/bin/env bash
# Issue 26's checks on a CUDA machine, in one call (time limits per step add up to 9m20s):
#   1. the CUDA-marked tests of the ranking losses and the benchmark (sync debug mode, CUDA
#      graph capture, CPU/CUDA agreement, autocast + GradScaler, the benchmark on CUDA);
#   2. the issue's two sizes, 8 x 49,104 anchors x 20 classes with 2,000 positives and
#      2 x 200,000 x 80 with 500: time, peak memory and host synchronisations per call of
#      AP-loss (default kernel: sync-free on CUDA; and each kernel forced) and AUC-loss, against
#      focal loss masked (as RetinaNet calls it) and over all entries;
#   3. the share of the classification loss in one RetinaNet R50-FPN training iteration
#      (configs/VOC-Detection/retinanet_R_50_FPN_160e_voc0712_ap.yaml, random init, 8 images
#      512x512), with AP-loss and with focal loss.
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
  VOC_SIZES=(--images 2 --anchors 600 --classes 4 --positives 12)
  COCO_SIZES=(--images 1 --anchors 900 --classes 8 --positives 5)
  ROUNDS=(--repeats 2 --warmup 1 --no-memory)
  BREAKDOWN_SIZES=(--images 1 --size 128 --iters 1 --warmup 0)
  TEST_SELECTION=(tests/test_ranking_kernels.py -m "not cuda and not slow")
else
  DEVICE=cuda
  VOC_SIZES=(--images 8 --anchors 49104 --classes 20 --positives 2000)
  COCO_SIZES=(--images 2 --anchors 200000 --classes 80 --positives 500)
  ROUNDS=(--repeats 10 --warmup 2)
  BREAKDOWN_SIZES=(--images 8 --size 512 --iters 5 --warmup 2)
  TEST_SELECTION=(tests/test_ranking_kernels.py tests/test_losses.py tests/test_loss_amp.py
                  tests/test_amp.py tests/test_benchmark.py -m cuda)
fi
LOSSES=(--losses focal focal_plain ap_loss ap_loss_grid ap_loss_sync_free auc_loss)

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

step tests 150 "$PY" -m pytest -q -p no:cacheprovider -rs "${TEST_SELECTION[@]}"
step benchmark_voc 110 "$PY" -m tools.benchmark --device "$DEVICE" "${VOC_SIZES[@]}" \
  "${ROUNDS[@]}" "${LOSSES[@]}" --output-dir "$RESULTS/benchmark_voc"
step benchmark_coco 140 "$PY" -m tools.benchmark --device "$DEVICE" "${COCO_SIZES[@]}" \
  "${ROUNDS[@]}" "${LOSSES[@]}" --output-dir "$RESULTS/benchmark_coco"
step breakdown_ap 80 "$PY" -m tools.benchmark --breakdown --device "$DEVICE" \
  "${BREAKDOWN_SIZES[@]}" --output-dir "$RESULTS/breakdown_ap"
step breakdown_focal 80 "$PY" -m tools.benchmark --breakdown --device "$DEVICE" \
  "${BREAKDOWN_SIZES[@]}" --cls-loss focal --output-dir "$RESULTS/breakdown_focal"

echo "[gpu_check] results in $RESULTS (exit status $status)"
exit $status
