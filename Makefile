# Two commands a newcomer types:  `make run`  and  `make test`.
# torch==2.13.0 is installed first: asking pip for plain `torch` pulls GBs of CUDA wheels.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
TORCH_VERSION ?= 2.13.0

.PHONY: install run test lint typecheck
install:
	$(PIP) install -q torch==$(TORCH_VERSION)
	$(PIP) install -q -e ".[test]"

# The main job: MAML on the paper's sinusoid setting (1-40-40-1 ReLU, K=10 training / K=5 test,
# alpha 0.01, Adam 1e-3, meta-batch 25) meta-trained on the query loss after 1 and 5 inner steps
# (60,000 iterations, compiled, 1 thread: ~7 min on 2 cores incl. the one-time compile),
# evaluated on 600 tasks next to the paper's Table 2 (with 95% CIs and the diverged count per
# step count), with learning curves and the paper's Figure 2 in runs/sinusoid-maml/. Why not
# the paper's one-step objective: README "Reproduction results" and results/sinusoid-divergence.
run: install
	OMP_NUM_THREADS=1 $(PYTHON) -m metagrad train sinusoid-multistep --compile --output runs/sinusoid-maml --overwrite

lint:
	$(PYTHON) -m ruff check src tests benchmarks
	$(PYTHON) -m ruff format --check src tests benchmarks

typecheck:
	$(PYTHON) -m mypy

test: install lint typecheck
	$(PYTHON) -m pytest
