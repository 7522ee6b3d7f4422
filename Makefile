# accelflow developer entry points. A fresh machine needs only `make run` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Pinned in the install step only: the package itself asks for torch>=2.4, so GPU machines
# can bring their own CUDA build (make TORCH='torch' or a pre-built venv).
TORCH ?= torch==2.13.0
FMNIST ?= /usr/share/datasets/fashion-mnist
ARGS ?=

# Offline and quiet by default; values already in the environment win.
export MLFLOW_DISABLE_TELEMETRY ?= true
export DO_NOT_TRACK ?= true
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 90

.PHONY: run test test-fast lint format data setup clean help

help:
	@echo "make run    - set up and run the pipeline on embedded defaults (ARGS='--set train.epochs=3')"
	@echo "make test   - set up and run the test suite"
	@echo "make lint   - ruff"
	@echo "make clean  - remove stage outputs and the local MLflow store (keeps .venv)"

setup: $(BIN)/.installed

$(BIN)/.installed: pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "accelflow needs Python 3.11+"'
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) || { \
	  echo "could not create $(VENV): install python3-venv (apt-get install python3-venv)"; exit 1; }
	$(BIN)/python -m pip install --quiet --upgrade pip
	# bytecode is compiled at install time on purpose: without .pyc files every process
	# (Dask workers, DDP ranks) spends seconds re-compiling the stack on import
	$(BIN)/python -m pip install --quiet -c constraints.txt '$(TORCH)' -e '.[dev]'
	@touch $@

data:
	@if [ -f "$(FMNIST)/train-images-idx3-ubyte.gz" ]; then exit 0; fi; \
	if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  echo "installing Debian's dataset-fashion-mnist into $(FMNIST)"; \
	  (apt-get install -y -qq dataset-fashion-mnist || (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist)) >/dev/null; \
	elif command -v sudo >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then \
	  sudo apt-get install -y -qq dataset-fashion-mnist >/dev/null; \
	fi; \
	if [ ! -f "$(FMNIST)/train-images-idx3-ubyte.gz" ]; then \
	  echo "Fashion-MNIST not found in $(FMNIST). Either install Debian's 'dataset-fashion-mnist'"; \
	  echo "package, copy the four IDX .gz files (train-/t10k- images and labels) there, or run"; \
	  echo "your own data: make run ARGS='--set data.source=/path/data.csv --set data.label=target'"; \
	fi

run: setup data
	$(BIN)/accelflow run $(ARGS)

test: setup data
	$(BIN)/python -m pytest $(ARGS)

test-fast: setup data
	$(BIN)/python -m pytest -m "not slow and not integration" $(ARGS)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf .accelflow mlflow.db mlartifacts
