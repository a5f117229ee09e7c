# Quick start: `make demo` (the whole SFD pipeline on the built-in dataset) and `make test`.
# Both create .venv and install the pinned requirements on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast setup clean help

help:
	@echo "make demo   - pretrain, forget, sample, evaluate and report on the built-in dataset (runs/demo)"
	@echo "make test   - run the test suites of DDPM/ and SD/"
	@echo "make setup  - only create $(VENV) and install requirements.txt"

setup: $(STAMP)

$(STAMP): requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $(STAMP)

demo: $(STAMP)
	cd DDPM && ../$(PY) demo.py --outdir ../runs/demo

test: $(STAMP)
	cd DDPM && ../$(PY) -m pytest -q tests
	if [ -d SD/tests ]; then cd SD && ../$(PY) -m pytest -q tests; fi

clean:
	rm -rf runs
