# Entry points. `make main` and `make test` each set up .venv first (idempotent).
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup main test env benchmark
setup:
	bash tools/setup_env.sh

main: setup
	$(PY) tools/main_job.py

test: setup
	$(PY) -m pytest -q tests

env: setup
	$(PY) -m ap_loss_d2.env

benchmark: setup
	$(PY) -m ap_loss_d2.benchmark
