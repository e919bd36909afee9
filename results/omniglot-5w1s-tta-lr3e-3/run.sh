#!/bin/bash
# Time to accuracy with a 3x larger meta learning rate (Adam 3e-3, constant), otherwise the
# protocol of results/omniglot-5w1s-time-to-accuracy/ (meta-batch 8, 5 training queries per
# class, alpha 0.4, 1 inner step). Trained in stages with exact resume; each stage ends with the
# CLI's evaluation on the same 600 test tasks, copied to it-<N>/. Whether 3e-3 is better is
# read on validation (metrics.csv, 100 validation tasks at each stage end), against the 1e-3 run's.
# 2 threads, nothing else running.
set -euo pipefail
OUT=runs/omniglot-5w1s-tta-lr3e-3
ARCH=results/omniglot-5w1s-tta-lr3e-3
FLAGS="--data ../shared/data/omniglot --meta-batch 8 --queries 5 --lr-schedule constant \
  --meta-lr 3e-3 --split 0.8,0.05,0.15 --val-every 250 --val-tasks 100 --no-progress --no-plots"
first=--overwrite
for n in 500 1000 1500; do
  OMP_NUM_THREADS=2 metagrad train omniglot $FLAGS --iterations $n --output $OUT $first \
    > $ARCH/train-it$n.log 2>&1
  first=--resume
  mkdir -p $ARCH/it-$n && cp $OUT/results.json $OUT/test_losses.csv $ARCH/it-$n/
done
cp $OUT/metrics.csv $OUT/checkpoint.pt $ARCH/
