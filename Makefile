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
N ?= 2

# As root on Debian with the data missing, install the package that ships the raw IDX files.
DEBIAN_DATA = if [ "$(DATASET)" = fashion-mnist ] && [ ! -e $(DEBIAN_FMNIST) ] && [ "$$(id -u)" = 0 ] \
	&& command -v apt-get >/dev/null; then \
	echo "[setup] installing Debian package dataset-fashion-mnist"; \
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null; fi

.PHONY: help setup data train evaluate plan study resume status workers dashboard demo test bench ui lint clean

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

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

study: setup ## run a study, or resume it after a crash with the same command: make study STUDY=studies/beta.yaml
	$(PY) -m pipeline study $(STUDY)

resume: study ## alias of make study: continue a killed study, losing nothing finished

status: $(STAMP) ## the trial table of a study: make status STUDY=studies/beta.yaml
	$(PY) -m pipeline status $(STUDY)

workers: setup ## N worker processes on one study (one per GPU if several): make workers STUDY=… N=4
	$(PY) -m pipeline workers $(STUDY) -n $(N)

dashboard: $(STAMP) ## optuna-dashboard for a study on 127.0.0.1:8080: make dashboard STUDY=…
	$(PY) -m pipeline dashboard $(STUDY)

demo: setup ## set up, then run the demo study (β × likelihood grid, train + evaluate each) on CPU in a few minutes
	$(PY) -m pipeline study studies/demo.yaml
	@echo
	$(PY) -m pipeline status studies/demo.yaml
	@echo
	@echo "Demo done: 4 trainings, each evaluated on the test set (likelihood, collapse, sharpness)."
	@echo "  make ui                                # http://127.0.0.1:$(PORT), experiment 'demo': the study run,"
	@echo "                                         # a child run per trial with per-step losses, test/* metrics, images"
	@echo "  make dashboard STUDY=studies/demo.yaml  # http://127.0.0.1:8080, the Optuna view of the same study"
	@echo "Killed midway? Run make demo again: finished trials are kept, the interrupted one resumes."

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
