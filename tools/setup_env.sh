#!/usr/bin/env bash
# Build (or re-check) the project's environment. Idempotent: a second run only verifies.
#
#   bash tools/setup_env.sh              # project-local .venv (default)
#   VENV=/path/to/env bash tools/setup_env.sh
#   AP_LOSS_D2_DETECTRON2=official|pypi bash tools/setup_env.sh   # force a Detectron2 path
#
# Detectron2 is resolved by tools/install_detectron2.py in this order:
#   1. a Detectron2 already importable in the environment is kept as it is;
#   2. the official source (git+https://github.com/facebookresearch/detectron2.git), if reachable;
#   3. the PyPI fallback: the `pb1-detectron2==0.6` sdist (v0.6 Python sources) built with a
#      placeholder `_C` and the pins in tools/d2_fallback/constraints.txt.
# Pins: setuptools<81 on every path (below); the fallback's own pins are in its constraints.txt;
# the official path otherwise gets today's releases of everything Detectron2 requires.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
# torch/torchvision installed when the environment has none. CUDA users: install the torch
# build matching their driver first (https://pytorch.org), it is then kept.
TORCH_SPEC=${TORCH_SPEC:-"torch==2.14.1 torchvision==0.29.1"}

log() { echo "[setup] $*"; }

if [ ! -x "$VENV/bin/python" ]; then
  log "creating virtual environment $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check)

if ! "$PY" -c "import torch, torchvision" >/dev/null 2>&1; then
  log "installing $TORCH_SPEC"
  # No numpy pin here: the official path resolves today's numpy (2.x; matplotlib's contourpy
  # needs numpy>=1.25); the offline fallback installs numpy<1.24 from its constraints.txt.
  "${PIP[@]}" install $TORCH_SPEC
else
  log "torch/torchvision present: $("$PY" -c 'import torch, torchvision; print(torch.__version__, torchvision.__version__)')"
fi

# The one pin on every path: setuptools<81. Detectron2 (v0.6 and main) does `import pkg_resources`
# in detectron2/model_zoo/model_zoo.py (model_zoo.get_config, Detectron2's own LazyConfigs and
# tools), and setuptools 81 removed pkg_resources. The project's own configs do not need it
# (they use ap_loss_d2.model_zoo); the pin keeps Detectron2's model zoo usable. setuptools is
# also what the --no-build-isolation builds below use.
if ! "$PY" -c "import pkg_resources" >/dev/null 2>&1; then
  log "installing setuptools<81 (pkg_resources, imported by detectron2.model_zoo)"
  "${PIP[@]}" install "setuptools<81"
fi

"$PY" tools/install_detectron2.py

# OpenCV for Detectron2's Visualizer (Fig. 5 / 12: studies.visualize and its tests).
# Headless (no GUI libraries). 4.11.0.86 is the newest release whose wheels take numpy 1.x as
# well as 2.x (numpy>=1.23.5 on Python 3.11, so the fallback's numpy<1.24 is kept; 4.12 needs
# numpy>=2). An OpenCV already importable (e.g. opencv-python) is kept.
OPENCV_SPEC=${OPENCV_SPEC:-"opencv-python-headless==4.11.0.86"}
if ! "$PY" -c "import cv2" >/dev/null 2>&1; then
  log "installing $OPENCV_SPEC (Detectron2's Visualizer)"
  "${PIP[@]}" install "$OPENCV_SPEC"
else
  log "OpenCV present: $("$PY" -c 'import cv2; print(cv2.__version__)')"
fi

if ! "$PY" -c "import ap_loss_d2, pytest" >/dev/null 2>&1 \
   || [ "$("$PY" -c 'import ap_loss_d2, os; print(os.path.dirname(os.path.dirname(ap_loss_d2.__file__)))')" != "$(pwd)" ]; then
  log "installing ap_loss_d2 (editable) with test extras"
  "${PIP[@]}" install --no-build-isolation -e ".[test]"
else
  log "ap_loss_d2 already installed from $(pwd)"
fi
"$PY" -m tools.env --short
