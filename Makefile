# make setup   create .venv and install everything (idempotent)
# make test    setup, then the whole test suite (what CI runs)
# make serve   setup, start TorchServe on 127.0.0.1 with the shipped models, classify two images
# make stop    stop TorchServe
# make archives  rebuild deployment/model-store/*.mar from the trained checkpoints
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# TorchServe starts its Python workers with the first python on PATH: the venv's.
export PATH := $(CURDIR)/$(BIN):$(PATH)
MODELS := base_cnn efficientnet_lite0
IMAGES := tests/fixtures/images/test1/2124.jpg tests/fixtures/images/train/cat.0.jpg

.PHONY: setup test serve stop archives

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	@command -v java >/dev/null || { echo "TorchServe needs Java 11+: apt-get install -y openjdk-17-jre-headless" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.txt
	touch $@

test: setup
	$(BIN)/python -m pytest -q

archives: setup
	deployment/archive.sh $(MODELS)

# TorchServe keeps writing its log to the terminal it was started from; send that to a file.
serve: setup
	@mkdir -p logs
	torchserve --start --ncs --ts-config deployment/config.properties --model-store deployment/model-store \
	    --models $(foreach m,$(MODELS),$(m)=$(m).mar) > logs/console.log 2>&1
	@for m in $(MODELS); do \
	    for i in $$(seq 120); do \
	        curl -s http://127.0.0.1:8081/models/$$m | grep -q '"READY"' && break; sleep 1; \
	    done; \
	    curl -s http://127.0.0.1:8081/models/$$m | grep -q '"READY"' || { echo "$$m did not load: see logs/model_log.log" >&2; exit 1; }; \
	    for img in $(IMAGES); do \
	        printf '%s %s -> ' $$m $$img; curl -s -X POST http://127.0.0.1:8080/predictions/$$m -T $$img; echo; \
	    done; \
	done
	@echo "TorchServe is running on 127.0.0.1:8080 (logs in logs/; stop it with: make stop)"

stop:
	-torchserve --stop
