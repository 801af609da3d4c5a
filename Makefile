# Entry points. `make main` and `make test` each set up .venv first (idempotent).
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup main test test-fast test-d2-main env benchmark check-d2-source
setup:
	bash tools/setup_env.sh

main: setup
	$(PY) -m studies.main_job

test: setup
	$(PY) -m pytest -q tests

# pure-tensor, config and model-step tests: no training run, no launched process (docs/development.md)
test-fast: setup
	$(PY) -m pytest -q -m "not slow" tests

env: setup
	$(PY) -m tools.env

benchmark: setup
	$(PY) -m tools.benchmark

# The whole suite against Detectron2 main, built from the snapshot beside the clone
# (../shared/detectron2-main) with the placeholder ops and .venv's torch (docs/development.md)
D2_MAIN_SNAPSHOT ?= ../shared/detectron2-main/detectron2-main.tar.gz
D2_MAIN_TESTS ?= tests
test-d2-main: setup
	@test -f "$(D2_MAIN_SNAPSHOT)" || { echo "test-d2-main: no Detectron2 main snapshot at $(D2_MAIN_SNAPSHOT) (set D2_MAIN_SNAPSHOT=...)"; exit 2; }
	d=$$(mktemp -d /tmp/ap_loss_d2-d2main.XXXXXX) && trap 'rm -rf "$$d"' EXIT && \
	tar -xzf "$(D2_MAIN_SNAPSHOT)" -C "$$d" && \
	TORCH_FROM="$(abspath $(VENV))" bash tools/check_detectron2_source.sh "$$d/detectron2-main" "$$d/venv" -- $(D2_MAIN_TESTS)

# Compatibility check against a Detectron2 source tree (docs/development.md):
#   make check-d2-source D2_SOURCE=/path/to/detectron2 [D2_VENV=/tmp/venv-d2]
D2_VENV ?= /tmp/ap_loss_d2-d2src-venv
check-d2-source:
	@test -n "$(D2_SOURCE)" || { echo "usage: make check-d2-source D2_SOURCE=/path/to/detectron2 [D2_VENV=...]"; exit 2; }
	bash tools/check_detectron2_source.sh $(D2_SOURCE) $(D2_VENV)
