# The project's verbs. Every target works on a fresh machine: it makes the virtualenv it needs.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
REPO ?= model_repository
PORT ?= 8001
STAMP := $(VENV)/.installed
PROTOS := $(wildcard protos/pipeserve/v1/*.proto)
GENERATED := $(PROTOS:.proto=_pb2.py)
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install proto models run test test-fast test-gpu bench soak lint layers clean

install: $(STAMP) $(GENERATED)

# torch goes first and pinned, so that no later resolution can pull a multi-GB CUDA build.
$(STAMP): pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip "setuptools>=69" wheel
	$(PIP) install torch==2.13.0
	$(PIP) install "grpcio-tools>=1.81,<1.82" "protobuf>=6.30,<7"
	$(MAKE) proto
	$(PIP) install --no-build-isolation -e ".[test,models]"
	touch $@

proto: $(GENERATED)

$(GENERATED) &: $(PROTOS)
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=protos --pyi_out=protos --grpc_python_out=protos $(PROTOS)

# The default model repository: tiny local models, built offline. `install` is phony, so this
# runs on every `make models`: the builder skips the models its current version made (a stamp in
# each model folder) and rebuilds those an older version made.
$(REPO)/.built: install
	$(VENV)/bin/pipeserve models init $(REPO)
	touch $@

models: $(REPO)/.built

run: models
	$(VENV)/bin/pipeserve serve --model-repository $(REPO) --port $(PORT)

# The layer rules (pyproject.toml [tool.importlinter]) first: a forbidden import fails at once.
test: install
	$(VENV)/bin/lint-imports
	bash tests/prepare.sh
	$(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -q -x -m "not slow and not triton" $(PYTEST_ARGS)

test-gpu: install
	$(PY) -m pytest -q -m gpu -p no:cacheprovider --override-ini addopts="" $(PYTEST_ARGS)

# The Triton venv too, for bench.versus_triton (instant once built; skipped where Triton cannot run).
bench: install
	$(PIP) install "matplotlib>=3.8"
	bash tests/prepare.d/triton.sh
	$(PY) -m bench

soak: install
	$(PY) -m bench.soak

layers: install
	$(VENV)/bin/lint-imports

lint: install
	cd protos && npx --yes @bufbuild/buf@1.75.0 lint

clean:
	rm -rf $(VENV) $(GENERATED) protos/pipeserve/v1/*_pb2.pyi protos/pipeserve/v1/*_pb2_grpc.py
