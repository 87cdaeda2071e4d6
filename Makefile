# make setup   create .venv and install everything (idempotent)
# make test    setup, then the whole test suite (what CI runs)
# make serve   setup, archive the shipped models, start TorchServe on 127.0.0.1:8080
# make stop    stop TorchServe
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

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

