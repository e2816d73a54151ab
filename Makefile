# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test test-docker images test-unit test-integration lint format proto bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch/torchvision are pinned first: on our machines they come from local disk.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/tb demo

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q tests --ignore=tests/docker

# The docker-compose stack for real: starts an engine if none answers (and stops only that one),
# builds the images offline (`make images`), runs tests/docker, tears everything down.
test-docker: $(STAMP)
	PYTHON=$(abspath $(BIN))/python bash docker/offline/test-docker.sh

# Every image the stack needs, built with no registry: debootstrap bases, a host wheelhouse,
# the sidecar from docker/Dockerfile.cpu, stand-ins for Milvus/etcd/MinIO (docker/README.md).
images: $(STAMP)
	PYTHON=$(abspath $(BIN))/python bash docker/offline/build-images.sh

test-unit: $(STAMP)
	$(BIN)/python -m pytest -q tests/unit

test-integration: $(STAMP)
	$(BIN)/python -m pytest -q tests/integration

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
