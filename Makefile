# Quick start: `make demo` (the whole SFD pipeline on the built-in dataset) and `make test`.
# Both create .venv and install the pinned requirements on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Each suite is spread over the machine's cores (pytest-xdist; about 2x on 2 cores, the tests start the
# long end-to-end modules first). PYTEST_WORKERS=0 runs a suite in one process, PYTEST_WORKERS=4 uses 4.
PYTEST_WORKERS ?= auto
XDIST := -n $(PYTEST_WORKERS) --maxprocesses 8 --dist worksteal

.PHONY: demo compare test test-fast setup clean help

help:
	@echo "make demo   - pretrain, forget, sample, evaluate and report on the built-in dataset (runs/demo)"
	@echo "make compare - SFD, Retrain, SA, SalUn, ESD (and VDU) at an equal budget on the built-in dataset (runs/compare)"
	@echo "make test   - run the test suites of DDPM/ and SD/ (EVAL_EXTRA=1: with the NudeNet extra)"
	@echo "make setup  - only create $(VENV) and install requirements.txt"

setup: $(STAMP)

$(STAMP): requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $(STAMP)

demo: $(STAMP)
	cd DDPM && $(abspath $(PY)) demo.py --outdir ../runs/demo

# Every unlearning method on the built-in dataset, one table (reuses runs/demo's teacher and classifier).
compare: $(STAMP)
	cd DDPM && $(abspath $(PY)) compare.py --outdir ../runs/compare

# EVAL_EXTRA=1 also installs SD/requirements-eval.txt (NudeNet: its wheel carries an AGPL licence file,
# so it is an opt-in extra) and runs the tests that use the real detector; without it they are skipped.
test: $(STAMP)
	if [ -n "$(EVAL_EXTRA)" ]; then $(PY) -m pip install --quiet -r SD/requirements-eval.txt; fi
	@# Both suites run whatever the first one does; the target fails if either failed.
	@status=0; \
	(cd DDPM && $(abspath $(PY)) -m pytest -q $(XDIST) tests) || status=1; \
	(cd SD && $(abspath $(PY)) -m pytest -q $(XDIST) tests) || status=1; \
	if [ $$status -ne 0 ]; then echo "make test: at least one suite failed (see above)"; fi; \
	exit $$status

clean:
	rm -rf runs
