# make bench: the main job (benchmark). make test: the test suite (CPU; Triton via its interpreter).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv venv-int test test-integrations bench bench-quick bench-pytest gpu-check clean

venv: $(STAMP)

$(STAMP): requirements-dev.txt setup.py pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

# Two pytest processes (pytest-xdist) for the interpreter tests; then the AOT tests, whose fixture
# already compiles sm_80 and sm_90 in two processes at once (alongside xdist workers it would
# oversubscribe 2 cores and hit its compile timeout).
test: $(STAMP)
	$(PY) -m pytest -q -n 2 tests --ignore=tests/test_aot.py
	$(PY) -m pytest -q tests/test_aot.py

# The trainer integrations against the real packages (verl 0.9.1), in a venv of their own so that
# the core one never holds them. The constraints file holds the core pins (torch 2.13.0: the CPU
# wheel; numpy<2.4) against what verl and its dependencies would otherwise pull.
VENV_INT ?= .venv-int
PY_INT := $(VENV_INT)/bin/python
STAMP_INT := $(VENV_INT)/.installed

venv-int: $(STAMP_INT)

$(STAMP_INT): requirements-integrations.txt constraints-integrations.txt setup.py pyproject.toml
	$(PYTHON) -m venv $(VENV_INT)
	$(PY_INT) -m pip install -q --upgrade pip
	$(PY_INT) -m pip install -q -c constraints-integrations.txt -r requirements-integrations.txt
	$(PY_INT) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP_INT)

test-integrations: $(STAMP_INT)
	$(PY_INT) -m pytest -q tests/integrations

bench: $(STAMP)
	$(PY) -m bench.run

bench-quick: $(STAMP)
	$(PY) -m bench.run --quick

# the pytest-benchmark smoke tests of every competitor and the benchmark's own tests (the host-path and
# compile-time measurements run and report their fields)
bench-pytest: $(STAMP)
	$(PY) -m pytest -q bench

gpu-check:  # on a GPU machine: everything only a GPU shows (without CUDA: a dry run on the CPU)
	bash bench/gpu_check.sh

clean:
	rm -rf $(VENV) $(VENV_INT) build *.egg-info
