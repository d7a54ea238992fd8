# Every target sets itself up: a virtual environment in .venv with the package and its dev extras.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mvmr-installed

.PHONY: demo test lint bench bench-quality gpu-check clean

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
	$(PY) benchmarks/bench_distill.py --quick
	$(PY) benchmarks/bench_teachers.py --quick
	$(PY) benchmarks/bench_protocols.py --quick

# The full quality grid behind the README's defaults table (about 70 minutes on 2 CPU cores).
bench-quality: $(STAMP)
	$(PY) benchmarks/bench_quality.py

# On a CUDA machine: the GPU tests, every benchmark on CUDA and a real distillation, written to
# benchmarks/results/*-cuda.json (benchmarks/gpu_check.py). Its own environment sees the machine's
# packages, so that its CUDA build of torch is used rather than downloaded again; an offline machine
# installs the missing ones from wheels put in .whl/.
GPU_VENV ?= .venv-gpu
gpu-check:
	$(PYTHON) -m venv --system-site-packages $(GPU_VENV)
	$(GPU_VENV)/bin/python -m pip install --quiet $(if $(wildcard .whl/*.whl),--no-index --find-links .whl) -e ".[dev]"
	$(GPU_VENV)/bin/python benchmarks/gpu_check.py

clean:
	rm -rf $(VENV) $(GPU_VENV) demo-output
