# Two commands on a fresh machine: `make demo` (the main job, offline) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: demo test install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# the CPU build of PyTorch first, where this machine has it; otherwise the export extra brings torch
	$(PY) -m pip install --quiet torch==2.13.0 || echo "torch 2.13.0 not available here; pip picks a torch for edgevlm[export]"
	# llama-cpp-python compiles llama.cpp from source on first install (~7 min on 2 cores; cached afterwards)
	$(PY) -m pip install --quiet -e '.[export,dev]'
	rm -f $(VENV)/.installed-*
	touch $@

demo: $(STAMP)
	$(VENV)/bin/edgevlm demo

test: $(STAMP)
	# the import contracts of pyproject.toml first: in a second, each broken one with its import chain
	$(VENV)/bin/lint-imports --no-logo --no-cache
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) .cache
