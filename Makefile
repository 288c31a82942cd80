# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv/ on first use.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test lint install clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[all,dev]' 2>&1 | grep -v 'is ignored' || true
	$(PY) -c "import torch, ray, mlflow, unlearning, pipelines" && touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/unlearn demo

test: $(STAMP)
	$(VENV)/bin/ruff check unlearning pipelines tests benchmarks
	$(PY) -m pytest -q tests

lint: $(STAMP)
	$(VENV)/bin/ruff check unlearning pipelines tests benchmarks

clean:
	rm -rf $(VENV) demo-output mlflow.db mlartifacts
