# Every target sets itself up: a virtual environment in .venv with the package and its dev extras.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mvmr-installed

.PHONY: demo test floors lint bench bench-quality bench-quality-fashion gpu-wheels gpu-check clean

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
	$(MAKE) floors

# Every declared floor is a tested version: each direct requirement of pyproject.toml pinned to its
# floor (.ci/floor_constraints.py; torch and torchvision are the machine's, their floors being the GPU
# node's that gpu-check runs on), then the fast tests. About 4 minutes on 2 cores; make test ends with it.
# torch, torchvision and their CUDA libraries are linked in from $(VENV), not installed a second time:
# 6 GB more ran a CI runner's disk full.
FLOORS_VENV ?= .venv-floors
FLOOR_TESTS ?= tests/test_public_api.py tests/release/test_export.py tests/models/test_teacher.py tests/training/test_loop.py \
	tests/data/test_data_pipeline.py tests/storage/test_checkpoint.py tests/models/test_efficientnet_lite.py
floors: $(STAMP)
	rm -rf $(FLOORS_VENV)
	$(PYTHON) -m venv $(FLOORS_VENV)
	$(PY) .ci/floor_constraints.py --share-machine-packages $(FLOORS_VENV)
	$(PY) .ci/floor_constraints.py dev > $(FLOORS_VENV)/constraints.txt
	$(FLOORS_VENV)/bin/python -m pip install --quiet -c $(FLOORS_VENV)/constraints.txt -e ".[dev]"
	$(FLOORS_VENV)/bin/python -m pytest -q -m "not slow and not gpu" -p no:cacheprovider $(FLOOR_TESTS)

bench: $(STAMP)
	$(PY) benchmarks/bench_dcor.py --quick
	$(PY) benchmarks/bench_representations.py --quick
	$(PY) benchmarks/bench_step.py --quick
	$(PY) benchmarks/bench_loop.py --quick
	$(PY) benchmarks/bench_dataloading.py --quick
	$(PY) benchmarks/bench_evaluation.py --quick
	$(PY) benchmarks/bench_quality.py --quick
	$(PY) benchmarks/bench_distill.py --quick
	$(PY) benchmarks/bench_teachers.py --quick
	$(PY) benchmarks/bench_protocols.py --quick

# The full quality grid behind the README's defaults table (about 70 minutes on 2 CPU cores).
bench-quality: $(STAMP)
	$(PY) benchmarks/bench_quality.py

# Fashion-MNIST from Debian's dataset-fashion-mnist package (MIT): `apt-get install dataset-fashion-mnist`.
# The reference, the paper's objective and the defaults on both teachers (about 1 h 30 min on 2 cores); the
# other cells: benchmarks/bench_quality_fashion.py --cells ...
bench-quality-fashion: $(STAMP)
	$(PY) benchmarks/bench_quality_fashion.py --cells 0,1,17

# On a networked machine, for an offline GPU node: exactly the wheels the node lacks, in .whl/
# (.ci/offline_wheels.py). The node is named by its Python, its platform tag and its packages
# (`pip list --format=freeze` run there; GPU_PACKAGES defaults to the H200 node's list).
GPU_PYTHON ?= 3.12
GPU_PLATFORM ?= manylinux_2_28_x86_64
GPU_PACKAGES ?= .ci/h200-node-packages.txt
gpu-wheels: $(STAMP)
	$(PY) .ci/offline_wheels.py --python-version $(GPU_PYTHON) --platform $(GPU_PLATFORM) \
		--have $(GPU_PACKAGES) --extras test --dest .whl

# On a CUDA machine: the GPU tests, every benchmark on CUDA and a real distillation, written to
# benchmarks/results/*-cuda.json (benchmarks/gpu_check.py). It uses the machine's own CUDA build of
# torch rather than downloading one: when `python3` is already a virtual environment (the H200 node's
# is), the project is installed into it, since a venv made from it would see only the base
# interpreter's packages; otherwise into a venv that sees the system's. An offline machine installs
# the missing packages from the wheels `make gpu-wheels` put in .whl/.
GPU_VENV ?= .venv-gpu
GPU_PY = $(shell $(PYTHON) -c "import sys; print(sys.executable if sys.prefix != sys.base_prefix else '$(GPU_VENV)/bin/python')")
gpu-check:
	[ -x $(GPU_PY) ] || $(PYTHON) -m venv --system-site-packages $(GPU_VENV)
	$(GPU_PY) -m pip install --quiet $(if $(wildcard .whl/*.whl),--no-index --find-links .whl) -e ".[test]"
	$(GPU_PY) benchmarks/gpu_check.py

clean:
	rm -rf $(VENV) $(GPU_VENV) $(FLOORS_VENV) demo-output
