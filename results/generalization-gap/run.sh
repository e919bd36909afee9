#!/bin/bash
# Generalization gap (README "Reproduction results"): committed MAML checkpoints scored on tasks
# of their *training* classes (`metagrad eval --eval-split train`: the test's 600 tasks, shots and
# 15 queries per class), next to their test rows. 2 threads, nothing else running.
set -euo pipefail
G=results/generalization-gap
OMP_NUM_THREADS=2 metagrad eval results/omniglot-5w1s-time-to-accuracy/checkpoint.pt \
  --data ../shared/data/omniglot --eval-split train --no-plots \
  --output $G/omniglot-5w1s-maml-7k > $G/5w-7k-train.log 2>&1
OMP_NUM_THREADS=2 metagrad eval results/algorithms/omniglot-20w1s-maml/checkpoint.pt \
  --data ../shared/data/omniglot --eval-split train --no-plots \
  --output $G/omniglot-20w1s-maml-500 > $G/20w-500-train.log 2>&1
