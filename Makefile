# VAE ablation pipeline. `make help` lists the targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DATASET ?= fashion-mnist
DEBIAN_FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
PREPARED := data/processed/$(DATASET)/val5000-seed0/manifest.json
CONFIG ?= configs/default.yaml
SET ?=
PORT ?= 5000
RUN ?=
CHECKPOINT ?=
STUDY ?= studies/demo.yaml

# As root on Debian with the data missing, install the package that ships the raw IDX files.
DEBIAN_DATA = if [ "$(DATASET)" = fashion-mnist ] && [ ! -e $(DEBIAN_FMNIST) ] && [ "$$(id -u)" = 0 ] \
	&& command -v apt-get >/dev/null; then \
	echo "[setup] installing Debian package dataset-fashion-mnist"; \
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null; fi

.PHONY: help setup data train evaluate plan demo test bench ui lint clean

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip || echo "[setup] could not upgrade pip; continuing"
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $@

$(PREPARED): | $(STAMP)
	@$(DEBIAN_DATA)
	$(PY) -m pipeline prepare --dataset $(DATASET) --download

setup: $(STAMP) $(PREPARED) ## create .venv, install the package (editable, dev extras) and prepare the dataset (local copy, else download)

data: $(STAMP) ## prepare the dataset (DATASET=fashion-mnist|mnist; DOWNLOAD=1 allows a torchvision download)
	@$(DEBIAN_DATA)
	$(PY) -m pipeline prepare --dataset $(DATASET) $(if $(DOWNLOAD),--download)

train: setup ## train one config (CONFIG=file.yaml SET="objective.beta=4 train.epochs=5"); reruns resume
	$(PY) -m pipeline train --config $(CONFIG) $(foreach s,$(SET),--set $(s))

evaluate: setup ## evaluate a trained run: make evaluate RUN=<mlflow run id> (or CHECKPOINT=runs/…/checkpoint.pt)
	$(PY) -m pipeline evaluate $(if $(RUN),--run $(RUN),--checkpoint $(CHECKPOINT))

plan: $(STAMP) ## validate a study and list its trials without running them: make plan STUDY=studies/beta.yaml
	$(PY) -m pipeline plan $(STUDY)

demo: setup ## set up, prepare, train and evaluate the demo config on CPU (a few minutes), then say where to look
	$(PY) -m pipeline train --config configs/demo.yaml --set train.device=cpu $(foreach s,$(SET),--set $(s))
	@echo
	@echo "Demo done: trained, then evaluated on the test set (likelihood, collapse, sharpness)."
	@echo "  make ui      # then open http://127.0.0.1:$(PORT), experiment 'demo': per-step losses,"
	@echo "               # test/* metrics, and images under Artifacts (images/, eval/)"
	@echo "Run directory (checkpoint, metrics.json, eval/ images): runs/demo/"

test: setup ## set up and run the test suite (CPU, a few minutes)
	$(PY) -m pytest -q

bench: setup ## training throughput vs a DataLoader loop and vs tracking off; writes bench/RESULTS.md
	$(PY) bench/bench_train.py

ui: $(STAMP) ## serve the MLflow UI on 127.0.0.1 (PORT=5000) against the project's store
	$(PY) -m pipeline ui --port $(PORT)

lint: $(STAMP) ## ruff check
	$(PY) -m ruff check pipeline tests bench

clean: ## delete runs, the MLflow store and report output (keeps data/ and .venv/)
	rm -rf runs mlruns mlflow.db reports/*/
