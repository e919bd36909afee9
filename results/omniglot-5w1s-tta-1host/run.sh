#!/bin/bash
# Time to accuracy on one host: the run of results/omniglot-5w1s-time-to-accuracy/ (same
# command, seed and flags: constant Adam 1e-3, meta-batch 8, 5 training queries per class,
# alpha 0.4, 1 inner step), from scratch on one 2-core AMD EPYC host instead of stages split
# across two machines. Stages with exact resume; each ends with the CLI's evaluation on the same
# 600 test tasks, copied to it-<N>/. 2 threads, nothing else running.
set -euo pipefail
OUT=runs/omniglot-5w1s-tta-1host
ARCH=results/omniglot-5w1s-tta-1host
FLAGS="--data ../shared/data/omniglot --meta-batch 8 --queries 5 --lr-schedule constant \
  --split 0.8,0.05,0.15 --val-every 500 --val-tasks 100 --no-progress --no-plots"
first=--overwrite
for n in 3000 5000 6000 7000; do
  OMP_NUM_THREADS=2 metagrad train omniglot $FLAGS --iterations $n --output $OUT $first \
    > $ARCH/train-it$n.log 2>&1
  first=--resume
  mkdir -p $ARCH/it-$n && cp $OUT/results.json $OUT/test_losses.csv $ARCH/it-$n/
done
cp $OUT/metrics.csv $OUT/checkpoint.pt $ARCH/
