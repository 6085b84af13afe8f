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
STORAGE ?=
STORAGE_ARG = $(if $(STORAGE),--storage $(STORAGE))

# As root on Debian with the data missing, install the package that ships the raw IDX files.
DEBIAN_DATA = if [ "$(DATASET)" = fashion-mnist ] && [ ! -e $(DEBIAN_FMNIST) ] && [ "$$(id -u)" = 0 ] \
	&& command -v apt-get >/dev/null; then \
	echo "[setup] installing Debian package dataset-fashion-mnist"; \
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null; fi

# As root on Debian with no Chromium, install it: the report tests open the HTML in a real headless browser.
DEBIAN_CHROMIUM = if ! command -v chromium >/dev/null && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	echo "[setup] installing Debian package chromium (for the report's browser test)"; \
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; fi

# As root on Debian with no PostgreSQL server, install it: the scale-out tests start a real cluster.
DEBIAN_POSTGRES = if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && ! command -v initdb >/dev/null \
	&& [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	echo "[setup] installing Debian package postgresql (for the multi-worker tests)"; \
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; fi

.PHONY: help setup data train evaluate plan study resume status workers dashboard report demo test test-slow bench ui lint clean \
	postgres postgres-stop server server-stop

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

data: $(STAMP) ## prepare the dataset (DATASET=fashion-mnist|mnist|cifar10|svhn|celeba|PATH; DOWNLOAD=1 allows a torchvision download)
	@$(DEBIAN_DATA)
	$(PY) -m pipeline prepare --dataset $(DATASET) $(if $(DOWNLOAD),--download)

train: setup ## train one config (CONFIG=file.yaml SET="objective.beta=4 train.epochs=5"); reruns resume
	$(PY) -m pipeline train --config $(CONFIG) $(foreach s,$(SET),--set $(s))

evaluate: setup ## evaluate a trained run: make evaluate RUN=<mlflow run id> (or CHECKPOINT=runs/…/checkpoint.pt)
	$(PY) -m pipeline evaluate $(if $(RUN),--run $(RUN),--checkpoint $(CHECKPOINT))

plan: $(STAMP) ## validate a study and list its trials without running them: make plan STUDY=studies/beta.yaml
	$(PY) -m pipeline plan $(STUDY)

study: setup ## run a study, or resume it after a crash with the same command: make study STUDY=studies/beta.yaml
	$(PY) -m pipeline study $(STUDY) $(STORAGE_ARG)

resume: study ## alias of make study: continue a killed study, losing nothing finished

status: $(STAMP) ## the trial table of a study: make status STUDY=studies/beta.yaml
	$(PY) -m pipeline status $(STUDY) $(STORAGE_ARG)

workers: setup ## N worker processes on one study (one per GPU if several): make workers STUDY=… N=4
	$(PY) -m pipeline workers $(STUDY) -n $(N) $(STORAGE_ARG)

dashboard: $(STAMP) ## optuna-dashboard for a study on 127.0.0.1:8080: make dashboard STUDY=…
	$(PY) -m pipeline dashboard $(STUDY) $(STORAGE_ARG)

report: $(STAMP) ## write reports/<study>/ (report.html, report.md, summary.csv, figures/): make report STUDY=…
	$(PY) -m pipeline report $(STUDY) $(STORAGE_ARG)

demo: setup ## set up, then run the demo study (β × likelihood grid, train + evaluate each) on CPU in a few minutes
	$(PY) -m pipeline study studies/demo.yaml
	@echo
	$(PY) -m pipeline status studies/demo.yaml
	@echo
	$(PY) -m pipeline report studies/demo.yaml
	@echo
	@echo "Demo done: 4 trainings, each evaluated on the test set (likelihood, collapse, sharpness)."
	@echo "  report: $(or $(VAE_PIPELINE_HOME),$(CURDIR))/reports/demo/report.html   (open it in a browser; also report.md, summary.csv, figures/)"
	@echo "  make ui                                # the MLflow UI on http://127.0.0.1:$(PORT); then open the study's runs"
	@echo "                                         # (its summary on the study run, a child run per trial) and the best run:"
	@$(PY) -m pipeline ui --port $(PORT) --experiment demo --print-links | sed 's/^\[ui\] */      /'
	@echo "  make dashboard STUDY=studies/demo.yaml  # http://127.0.0.1:8080, the Optuna view of the same study"
	@echo "Killed midway? Run make demo again: finished trials are kept, the interrupted one resumes."

test: setup ## set up and run the test suite except the slow campaigns (CPU, ~12 min on 2 cores)
	@$(DEBIAN_CHROMIUM)
	@$(DEBIAN_POSTGRES)
	$(PY) -m pytest -q -m "not slow"

test-slow: setup ## the slow campaigns: a study killed a dozen times, a full disk, SIGKILL mid-trial, 3 workers on PostgreSQL (~5 min)
	@$(DEBIAN_CHROMIUM)
	@$(DEBIAN_POSTGRES)
	$(PY) -m pytest -q -m slow

bench: setup ## training throughput vs a DataLoader loop and vs tracking off, system-metrics cost, metric ingest, KID/precision/recall cost, PixelCNN sampling speed, report time (100 trials; 1,000 trials × 10,000 steps), status time, study trials/hour on PostgreSQL, tracking-server ingest; writes bench/RESULTS.md
	$(PY) bench/bench_train.py
	$(PY) bench/bench_system_metrics.py
	$(PY) bench/bench_tracking.py
	$(PY) bench/bench_sampling.py
	$(PY) bench/bench_sample_quality.py
	$(PY) bench/bench_report.py
	$(PY) bench/bench_report.py --scale 1000x10000
	$(PY) bench/bench_study.py
	$(PY) bench/bench_server.py

postgres: $(STAMP) ## start the project's PostgreSQL on 127.0.0.1:5433 (VAE_PG_PORT): Optuna + MLflow databases
	@$(DEBIAN_POSTGRES)
	$(PY) -m pipeline postgres

postgres-stop: $(STAMP) ## stop that PostgreSQL (its data is kept)
	$(PY) -m pipeline postgres --stop

server: postgres ## start an MLflow tracking server on 127.0.0.1:5000 (VAE_MLFLOW_PORT) backed by that PostgreSQL
	$(PY) -m pipeline server

server-stop: $(STAMP) ## stop the MLflow tracking server
	$(PY) -m pipeline server --stop

ui: $(STAMP) ## serve the MLflow UI on 127.0.0.1 (PORT=5000) against the project's store
	$(PY) -m pipeline ui --port $(PORT)

lint: $(STAMP) ## ruff check
	$(PY) -m ruff check pipeline tests bench

clean: ## delete runs, the MLflow store and report output (keeps data/ and .venv/)
	rm -rf runs mlruns mlflow.db reports/*/
