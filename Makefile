# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv/ on first use.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test lint install dist clean distclean

# A failing pip stops make here (its errors are shown, never filtered).
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c constraints.txt -e '.[all,postgres,timm,dev]'
	$(PY) -c "import torch, ray, mlflow, psycopg, unlearning, pipelines"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/unlearn demo

test: $(STAMP)
	$(VENV)/bin/ruff check unlearning pipelines tests benchmarks
	$(PY) -m pytest -q --durations=25 tests

lint: $(STAMP)
	$(VENV)/bin/ruff check unlearning pipelines tests benchmarks

# The wheel a cluster installs (cluster/ray-cluster.yaml): dist/amnesis-VERSION-py3-none-any.whl,
# with tune_configs/ inside.
dist: $(STAMP)
	rm -rf dist build
	$(PY) -m pip wheel --no-deps --wheel-dir dist .

# What the commands write in the working directory with their default paths: the demo, run
# directories, MLflow's store and artifacts, the request ledger, staging directories a killed
# command left behind; and what `make dist` built. .venv/ and benchmarks/cache/ stay.
clean:
	rm -rf demo-output runs mlruns mlartifacts mlflow.db requests.db .*.partial-* dist build

# clean, and the environment too (the next `make` reinstalls it, about 3 minutes).
distclean: clean
	rm -rf $(VENV) *.egg-info
