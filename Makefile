# make bench: the main job (benchmark). make test: the test suite (CPU; Triton via its interpreter).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv test bench bench-quick bench-pytest gpu-check clean

venv: $(STAMP)

$(STAMP): requirements-dev.txt setup.py pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) -m bench.run

bench-quick: $(STAMP)
	$(PY) -m bench.run --quick

bench-pytest: $(STAMP)
	$(PY) -m pytest -q bench --benchmark-only

gpu-check:  # on a GPU machine: everything only a GPU shows (without CUDA: a dry run on the CPU)
	bash bench/gpu_check.sh

clean:
	rm -rf $(VENV) build *.egg-info
