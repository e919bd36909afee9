#!/bin/bash
# Time to accuracy inside a 7-minute budget: one run whose length is set by the budget (2,800
# iterations at the 0.137 s per meta-iteration this 2-core EPYC host measured in
# results/omniglot-5w1s-tta-lr3e-3/), with the cosine schedule decaying Adam's 1e-3 to the
# 0 (min_lr) at the last iteration. Otherwise the protocol of
# results/omniglot-5w1s-time-to-accuracy/ (meta-batch 8, 5 training queries per class,
# alpha 0.4, 1 inner step); the CLI's evaluation on the same 600 test tasks at the end.
# 2 threads, nothing else running.
set -euo pipefail
OUT=runs/omniglot-5w1s-tta-cosine
ARCH=results/omniglot-5w1s-tta-cosine
OMP_NUM_THREADS=2 metagrad train omniglot --data ../shared/data/omniglot --meta-batch 8 \
  --queries 5 --lr-schedule cosine --split 0.8,0.05,0.15 --val-every 700 --val-tasks 100 \
  --no-progress --no-plots --iterations 2800 --output $OUT --overwrite > $ARCH/train.log 2>&1
cp $OUT/results.json $OUT/test_losses.csv $OUT/metrics.csv $OUT/checkpoint.pt $ARCH/
