# The README's two commands:  `make repro`  (install + dvc repro)  and  `make test`.
# Both create ./.venv on first use. torch comes from the package registry's regular build,
# which runs on CPU (a CPU-only torch wheel breaks torchvision and therefore timm).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup repro test dag mlflow-ui

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	$(BIN)/python -c "import torch, timm, webdataset, mlflow; print('torch', torch.__version__, 'timm', timm.__version__)"
	touch $(STAMP)

setup: $(STAMP)

repro: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro

test: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest

dag: $(STAMP)
	$(BIN)/dvc dag

mlflow-ui: $(STAMP)
	$(BIN)/mlflow ui --backend-store-uri "sqlite:///$(CURDIR)/mlflow.db" --host 127.0.0.1 --port 5000
