# Every target sets itself up: a virtual environment in .venv with the package and its dev extras.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mvmr-installed

.PHONY: demo test lint bench bench-quality clean

# PyTorch's OpenMP threads spin while they wait; on a machine whose cores are busy with other
# work (a shared CI runner, a laptop) that made CPU steps 15x slower. Passive waiting costs
# nothing measurable when the cores are free.
OMP_WAIT_POLICY ?= PASSIVE
export OMP_WAIT_POLICY

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) benchmarks/bench_dcor.py --quick
	$(PY) benchmarks/bench_representations.py --quick
	$(PY) benchmarks/bench_step.py --quick
	$(PY) benchmarks/bench_dataloading.py --quick
	$(PY) benchmarks/bench_evaluation.py --quick
	$(PY) benchmarks/bench_quality.py --quick

# The full quality grid behind the README's defaults table (about 45 minutes on 2 CPU cores).
bench-quality: $(STAMP)
	$(PY) benchmarks/bench_quality.py

clean:
	rm -rf $(VENV) demo-output
