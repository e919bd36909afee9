# Two commands a newcomer types:  `make run`  and  `make test`.
# torch==2.13.0 is installed first: asking pip for plain `torch` pulls GBs of CUDA wheels.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
TORCH_VERSION ?= 2.13.0

.PHONY: install run test lint typecheck
install:
	$(PIP) install -q torch==$(TORCH_VERSION)
	$(PIP) install -q -e ".[test]"

# The main job: the MAML paper's sinusoid preset (70,000 meta-iterations, compiled: ~8 min on
# 2 cores), evaluated on 600 tasks next to the paper's Table 2, with the two PNGs in runs/.
run: install
	$(PYTHON) -m metagrad train sinusoid --algorithm maml --compile --output runs/sinusoid-maml --overwrite

lint:
	$(PYTHON) -m ruff check src tests benchmarks
	$(PYTHON) -m ruff format --check src tests benchmarks

typecheck:
	$(PYTHON) -m mypy

test: install lint typecheck
	$(PYTHON) -m pytest
