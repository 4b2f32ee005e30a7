# tinyml_dagster: every target builds the virtualenv it needs from pyproject.toml (only python3 required).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export DAGSTER_HOME ?= $(CURDIR)/.dagster_home
# make demo RECORDING=path/to/spec.toml: the loop on a user's own recording (see README, "Your own recording")
ifdef RECORDING
export TINYML_RECORDING := $(abspath $(RECORDING))
endif

.PHONY: venv demo test dev bench report clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m tinyml_dagster.demo

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

dev: $(STAMP)
	mkdir -p $(DAGSTER_HOME)
	$(BIN)/python -m tinyml_dagster.dev

bench: $(STAMP)
	@for b in pipeline forest device deploy fleet faults dev_stack; do \
	  if [ -f benchmarks/$$b.py ]; then echo "== benchmarks/$$b.py"; $(BIN)/python benchmarks/$$b.py || exit 1; fi; \
	done

report: $(STAMP)
	$(BIN)/python -m tinyml_dagster.report

clean:
	rm -rf $(VENV) .dagster_home data/generated data/bench
