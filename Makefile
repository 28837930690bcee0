# Two commands do all set-up on a fresh machine:
#   make demo   -- creates .venv if needed, prepares real text, trains a tiny MD4 through launcher/submit.py
#   make test   -- creates .venv if needed, runs the test suite (what .ci/run calls)
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
export TIKTOKEN_CACHE_DIR :=
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions

.PHONY: env test-env demo test bench

# the package (all the demo needs); test-env adds the test and evaluation extras (pytest, lm-eval, wandb)
env: $(VENV)/.installed
test-env: $(VENV)/.installed-test

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	DS_BUILD_OPS=0 $(PY) -m pip install -q -c constraints.txt -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	DS_BUILD_OPS=0 $(PY) -m pip install -q -c constraints.txt -e '.[test]'
	touch $@

demo: env
	bash launcher/demo.sh

# TESTS selects files or node ids (default: the whole suite), PYTEST_ARGS adds pytest options; WORKERS
# pytest-xdist workers (the suite's jobs leave about 40% of 2 cores idle: start-up, SLURM's scheduling, waits
# for killed ranks), each file on one worker and the SLURM tests together, the longest first (tests/conftest.py;
# xdist's own order, by number of tests, is turned off); WORKERS=0: one process
TESTS ?= tests
WORKERS ?= 2
test: test-env
	$(PY) -m pytest -q --durations=25 $(if $(filter 0,$(WORKERS)),,-n $(WORKERS) --dist loadgroup --no-loadscope-reorder) $(TESTS) $(PYTEST_ARGS)
