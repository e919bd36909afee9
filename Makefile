# Two commands a newcomer types:  `make run`  and  `make test`.
# torch==2.13.0 is installed first: asking pip for plain `torch` pulls GBs of CUDA wheels.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
TORCH_VERSION ?= 2.13.0

.PHONY: install run test lint typecheck
install:
	$(PIP) install -q torch==$(TORCH_VERSION)
	$(PIP) install -q -e ".[test]"

# The main job: MAML on the paper's sinusoid preset, 10,000 meta-iterations (compiled: ~2 min
# on 2 cores incl. the one-time compile), evaluated on 600 tasks next to the paper's Table 2,
# with learning curves and the paper's Figure 2 in runs/sinusoid-maml/. The full 70,000-iteration
# preset is one flag away: `metagrad train sinusoid --compile` (~8 min); see README for why the
# shorter run is the default.
run: install
	$(PYTHON) -m metagrad train sinusoid --algorithm maml --compile --iterations 10000 --output runs/sinusoid-maml --overwrite

lint:
	$(PYTHON) -m ruff check src tests benchmarks
	$(PYTHON) -m ruff format --check src tests benchmarks

typecheck:
	$(PYTHON) -m mypy

test: install lint typecheck
	$(PYTHON) -m pytest
