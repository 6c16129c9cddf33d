# One-command set-up: every target creates the virtual environment it needs.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install test smoke book clean
PROFILE ?= smoke

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

# Train one smoke-profile run (the book's default scale) on the default offline corpus.
smoke: $(STAMP)
	$(PY) -m moe_core train --variant deep --profile smoke --seed 42

# Execute the book's notebooks for PROFILE (papermill, cached) and build _build/html offline.
book: $(STAMP)
	$(PY) -m moe_core book --profile $(PROFILE)

clean:
	rm -rf $(VENV) .cache runs executed _build
