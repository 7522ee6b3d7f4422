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

# Python writes each module's bytecode on its first import, even where the environment
# asks it not to (PYTHONDONTWRITEBYTECODE, set on some CI images): without .pyc files every
# process (Dask workers, DDP ranks) would spend seconds re-compiling the stack on import.
unexport PYTHONDONTWRITEBYTECODE

# Offline and quiet by default: the CLI, make serve, the tests and the benchmarks set the
# same variables from conf/telemetry.env (tasks/tracking.py); values already set win.

.PHONY: run test test-fast lint format docs data setup test-tools serve serve-model stop status clean help

help:
	@echo "make run    - set up and run the pipeline on embedded defaults (ARGS='--set train.epochs=3')"
	@echo "make test   - set up and run the test suite"
	@echo "make serve  - start Prefect server + worker and MLflow server on 127.0.0.1, register deployments"
	@echo "              (ALERT_WEBHOOK=URL: POST there when a run regresses; on PostgreSQL:"
	@echo "              ACCELFLOW_PREFECT_DATABASE=postgresql+asyncpg://..., ACCELFLOW_MLFLOW_BACKEND=postgresql+psycopg2://...)"
	@echo "make stop   - stop exactly what make serve started"
	@echo "make serve-model - MLflow's scoring server for the registry's champion on 127.0.0.1:5001"
	@echo "              (WORKERS=4: more uvicorn workers; MLFLOW_TRACKING_URI: the registry)"
	@echo "make lint   - ruff and the import contracts (the three floors)"
	@echo "make docs   - regenerate docs/configuration.md and build the docs site into .site/"
	@echo "make clean  - remove stage outputs and the local MLflow store (keeps .venv)"

setup: $(BIN)/.installed

$(BIN)/.installed: pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "accelflow needs Python 3.11+"'
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) || { \
	  echo "could not create $(VENV): install python3-venv (apt-get install python3-venv)"; exit 1; }
	$(BIN)/python -m pip install --quiet --upgrade pip
	# no bytecode at install: compiling all 20,000 modules took 64 of its 104 s; each
	# module is compiled once instead, by the first process that imports it (see below)
	$(BIN)/python -m pip install --quiet --no-compile -c constraints.txt '$(TORCH)' -e '.[dev]'
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

# The integration tests drive a real browser and validate the compose file: fetch the
# Debian tools when they are missing and apt is usable (root); otherwise those tests skip
# with the reason (and CI, which runs as root, fails on such a skip).
test-tools:
	@missing=""; command -v chromium >/dev/null 2>&1 || missing="$$missing chromium"; \
	command -v docker-compose >/dev/null 2>&1 || missing="$$missing docker-compose"; \
	if [ -n "$$missing" ] && command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  echo "installing$$missing (Debian packages, for the integration tests)"; \
	  (DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing || \
	   (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing)) >/dev/null; \
	elif [ -n "$$missing" ]; then echo "note:$$missing not installed; the tests that need them will skip"; fi

run: setup data
	$(BIN)/accelflow run $(ARGS)

# two pytest workers, one test file each at a time (module fixtures stay per file): most
# tests wait on processes and servers, so 2 cores do 1.25x the work (655 vs 817 s measured;
# three workers oversubscribe them: 791 vs 680 s on a fresh clone, 2026-12-03);
# the 15 slowest are listed at the end, so a CI log shows where its minutes went
test: setup data test-tools
	$(BIN)/python -m pytest -n 2 --dist loadfile --no-loadscope-reorder --durations=15 $(ARGS)

# the champion behind MLflow's REST scoring server, in the foreground (tracking: the local
# sqlite store unless MLFLOW_TRACKING_URI names another, e.g. make serve's server)
WORKERS ?= 1
serve-model: setup
	MLFLOW_TRACKING_URI=$${MLFLOW_TRACKING_URI:-sqlite:///mlflow.db} \
	  $(BIN)/python -m flows.serve model --workers $(WORKERS)

serve: setup data
	$(BIN)/python -m flows.serve start $(if $(ALERT_WEBHOOK),--alert-webhook '$(ALERT_WEBHOOK)')

stop:
	@if [ -x $(BIN)/python ]; then $(BIN)/python -m flows.serve stop; fi

status:
	@$(BIN)/python -m flows.serve status

# unit tests only: no end-to-end flow runs, no servers
test-fast: setup data
	$(BIN)/python -m pytest -m "not slow and not integration" $(ARGS)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports --no-cache

# the configuration reference is generated from the schema (a test fails when it is stale);
# the site builds in strict mode: a broken link or a missing page fails
docs: setup
	$(BIN)/python -m conf.reference > docs/configuration.md
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf .accelflow mlflow.db mlartifacts
