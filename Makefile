# One command for each job. Each sets up .venv first, so a fresh clone needs nothing else.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STORE ?= demo-store
EVENTS ?= 200000
JUPYTER_FLAGS := --no-browser --ip=127.0.0.1 $(if $(filter 0,$(shell id -u)),--allow-root,)

.PHONY: quickstart test lint types setup setup-test bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

setup: $(BIN)/python
	$(BIN)/pip install --quiet -e ".[notebooks]"

setup-test: $(BIN)/python
	$(BIN)/pip install --quiet -e ".[test,notebooks]"

# A demo store, a first temporal query, and JupyterLab on the quickstart notebook.
quickstart: setup
	$(BIN)/esw demo $(STORE) --events $(EVENTS) --seed 7
	$(BIN)/esw sql $(STORE) "select aggregate_id, arg_max(data->>'balanceAfter', version) as balance \
	  from events where aggregate_type = 'Account' and event_type in ('MoneyDeposited', 'MoneyWithdrawn') \
	  and recorded_at <= TIMESTAMPTZ '2024-01-03 14:03:00+00' group by aggregate_id \
	  order by aggregate_id limit 10"
	$(BIN)/esw replay $(STORE) --aggregate acc-00000001 --at 2024-01-03T14:03:00Z \
	  --fold esworkbench.demo_folds:ACCOUNT
	ESW_STORE=$(abspath $(STORE)) $(BIN)/jupyter lab notebooks/quickstart.ipynb $(JUPYTER_FLAGS)

lint: setup-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

types: setup-test
	$(BIN)/mypy

# The whole suite: lint, types, then every test.
test: setup-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	TZ=UTC $(BIN)/pytest
	TZ=America/New_York $(BIN)/pytest -q -p no:cacheprovider

bench: setup-test
	$(BIN)/python benchmarks/bench_store.py

clean:
	rm -rf $(VENV) $(STORE)
