#!/usr/bin/env bash
# Compatibility check: build a Detectron2 source tree into a separate virtual environment with
# ap_loss_d2's placeholder `_C` (tools/d2_fallback/vision.cpp, so no C++/CUDA op is compiled)
# and run this project's test suite against it. CI (.ci/run) runs it on Detectron2 main's
# snapshot after `make test` (make test-d2-main).
#
#   tools/check_detectron2_source.sh <detectron2 source tree> [venv dir] [-- pytest args]
#
#   git clone https://github.com/facebookresearch/detectron2 /tmp/d2-main
#   tools/check_detectron2_source.sh /tmp/d2-main /tmp/venv-d2-main
#   tools/check_detectron2_source.sh /tmp/d2-main /tmp/venv-d2-main -- tests/test_checkpoint.py
#
# The venv dir defaults to /tmp/ap_loss_d2-d2src-venv. A second run reuses the venv and rebuilds
# Detectron2 from the tree. Environment:
#   PYTHON=python3                  interpreter the venv is made from (ignored with TORCH_FROM)
#   TORCH_FROM=/path/to/venv        reuse that venv's torch/torchvision (and its CUDA wheels) by
#                                   symlinking them instead of downloading them again
#   TORCH_SPEC="torch torchvision"  what to install otherwise
#   SETUPTOOLS_SPEC="setuptools<81" as tools/setup_env.sh; set SETUPTOOLS_SPEC=setuptools to check
#                                   against a setuptools without pkg_resources
# The tree itself is not modified: it is copied (without .git) and the copy's
# detectron2/layers/csrc is replaced by the placeholder.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
log() { echo "[check-d2] $*"; }

if [ $# -lt 1 ] || [ ! -f "${1}/setup.py" ] || [ ! -d "${1}/detectron2" ]; then
  echo "usage: $0 <detectron2 source tree (with setup.py and detectron2/)> [venv dir] [-- pytest args]" >&2
  exit 2
fi
TREE=$(cd "$1" && pwd)
shift
VENV=/tmp/ap_loss_d2-d2src-venv
if [ $# -gt 0 ] && [ "$1" != "--" ]; then VENV=$1; shift; fi
if [ $# -gt 0 ] && [ "$1" = "--" ]; then shift; fi
PYTEST_ARGS=("$@")
[ ${#PYTEST_ARGS[@]} -gt 0 ] || PYTEST_ARGS=(tests)
SETUPTOOLS_SPEC=${SETUPTOOLS_SPEC:-"setuptools<81"}
TORCH_SPEC=${TORCH_SPEC:-"torch torchvision"}

if [ ! -x "$VENV/bin/python" ]; then
  if [ -n "${TORCH_FROM:-}" ]; then
    # Same base interpreter as the venv the torch wheels come from.
    log "creating $VENV from $TORCH_FROM/bin/python"
    "$TORCH_FROM/bin/python" -m venv "$VENV"
  else
    log "creating $VENV"
    "${PYTHON:-python3}" -m venv "$VENV"
  fi
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check)
CONSTRAINTS="$VENV/ap_loss_d2-check-constraints.txt"

if [ -n "${TORCH_FROM:-}" ]; then
  # Symlink the files of torch, torchvision and their big binary dependencies (nvidia-*, cuda-*,
  # triton) into the new venv; pip then installs only their small pure-Python dependencies.
  # Pinning their versions below keeps pip from ever replacing (and deleting through) the links.
  "$TORCH_FROM/bin/python" - "$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
      > "$CONSTRAINTS" <<'EOF'
import importlib.metadata as md
import os
import sys

dest = sys.argv[1]
for dist in md.distributions():
    name = dist.metadata["Name"].lower().replace("_", "-")
    if not (name in ("torch", "torchvision", "triton") or name.startswith(("nvidia-", "cuda-"))):
        continue
    print(f"{dist.metadata['Name']}=={dist.version}")
    for top in sorted({f.parts[0] for f in dist.files or () if f.parts[0] != ".."}):
        src = os.path.join(str(dist.locate_file("")), top)
        if os.path.exists(src) and not os.path.lexists(os.path.join(dest, top)):
            os.symlink(src, os.path.join(dest, top))
EOF
  log "linked from $TORCH_FROM: $(tr '\n' ' ' < "$CONSTRAINTS")"
  "${PIP[@]}" install -q -c "$CONSTRAINTS" $(grep -E '^(torch|torchvision)==' "$CONSTRAINTS")
else
  "$PY" -c "import torch, torchvision" 2>/dev/null || "${PIP[@]}" install -q $TORCH_SPEC
  # Same constraints from the installed metadata (also protects links made by an earlier
  # TORCH_FROM run of this venv).
  "$PY" -c "import importlib.metadata as md
for d in md.distributions():
    n = d.metadata['Name'].lower().replace('_', '-')
    if n in ('torch', 'torchvision', 'triton') or n.startswith(('nvidia-', 'cuda-')):
        print(f\"{d.metadata['Name']}=={d.version}\")" > "$CONSTRAINTS"
fi

# Detectron2's setup.py imports torch: build without isolation, so setuptools/wheel come first.
"${PIP[@]}" install -q -c "$CONSTRAINTS" "$SETUPTOOLS_SPEC" wheel

BUILD=$(mktemp -d /tmp/ap_loss_d2-d2src-build.XXXXXX)
trap 'rm -rf "$BUILD"' EXIT
COMMIT=unknown
if git -C "$TREE" rev-parse HEAD >/dev/null 2>&1; then
  COMMIT=$(git -C "$TREE" rev-parse HEAD)
  [ -z "$(git -C "$TREE" status --porcelain --untracked-files=no)" ] || COMMIT="$COMMIT (modified)"
fi
log "copying $TREE (commit $COMMIT) to $BUILD with the placeholder _C"
tar -C "$TREE" --exclude=.git --exclude=build --exclude='*.egg-info' -cf - . | tar -C "$BUILD" -xf -
rm -rf "$BUILD/detectron2/layers/csrc"
mkdir -p "$BUILD/detectron2/layers/csrc"
cp "$REPO/tools/d2_fallback/vision.cpp" "$BUILD/detectron2/layers/csrc/vision.cpp"
"${PIP[@]}" uninstall -q -y detectron2 pb1-detectron2 >/dev/null 2>&1 || true
"${PIP[@]}" install -q --no-build-isolation -c "$CONSTRAINTS" "$BUILD"
# What tools.env reports as the install path of this Detectron2.
"$PY" - "$VENV/ap_loss_d2-detectron2.json" "$TREE" "$COMMIT" <<'EOF'
import json, sys, time
out, tree, commit = sys.argv[1:]
detail = f"source tree {tree} at commit {commit}, placeholder _C (tools/check_detectron2_source.sh)"
json.dump({"path": "source-tree", "detail": detail, "source": tree, "commit": commit,
           "time": time.ctime()}, open(out, "w"), indent=1)
EOF

# ap_loss_d2's own dependencies and pytest; the package itself is imported from this checkout.
"${PIP[@]}" install -q -c "$CONSTRAINTS" $("$PY" - "$REPO/setup.py" <<'EOF'
import ast, sys
tree = ast.parse(open(sys.argv[1]).read())
call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
kw = {k.arg: ast.literal_eval(k.value) for k in call.keywords if k.arg in ("install_requires", "extras_require")}
print(" ".join(kw["install_requires"] + kw["extras_require"]["test"]))
EOF
)

cd "$REPO"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -m tools.env
"$PY" -m pip list --disable-pip-version-check 2>/dev/null \
  | grep -i -E '^(numpy|setuptools|omegaconf|hydra-core|pillow|matplotlib|fvcore|iopath|torch|torchvision|detectron2) ' || true
log "running: pytest -q ${PYTEST_ARGS[*]}"
"$PY" -m pytest -q "${PYTEST_ARGS[@]}"
