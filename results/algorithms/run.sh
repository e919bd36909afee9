#!/bin/bash
# Every algorithm on one protocol: the commands behind results/algorithms/ (README "Reproduction
# results"). Run one at a time from the repository root with ../shared/data/omniglot present;
# the wall times in the table are for this machine class (2-core Xeon), threads as stated.
set -euo pipefail
OMNI="--data ../shared/data/omniglot --meta-batch 8 --queries 5 --lr-schedule constant \
  --split 0.8,0.05,0.15 --val-every 500 --val-tasks 100 --no-progress --no-plots"
train() { name=$1; shift; metagrad train "$@" --output "results/algorithms/$name" --overwrite; }

# Sinusoid (preset sinusoid-quick: the MAML paper's network, K=10 training / K=5 test shots,
# alpha 0.01, Adam 1e-3, meta-batch 25, 10,000 iterations, 1 inner step in training).
for a in maml fomaml metasgd anil mamlpp; do
  OMP_NUM_THREADS=2 train "sinusoid-$a" sinusoid-quick --algorithm "$a" --no-progress --no-plots
done
# Reptile: 5 inner steps in training (tasks vmapped).
OMP_NUM_THREADS=1 train sinusoid-reptile sinusoid-quick --algorithm reptile --inner-steps 5 \
  --no-progress --no-plots

# Omniglot 5-way 1-shot (preset omniglot: conv-4 64 filters + BN, alpha 0.4 on the mean
# cross-entropy, 1 inner step in training, 0/1/3 at test, 15 test queries per class), meta-batch
# 8, 5 training queries per class, constant Adam 1e-3, 1,500 iterations for every algorithm.
# MAML: the 1,500-iteration checkpoint of the time-to-accuracy run (results/omniglot-5w1s-
# time-to-accuracy/run.sh, 2 threads), whose constant schedule makes it the same run.
for a in fomaml anil metasgd mamlpp; do
  OMP_NUM_THREADS=1 train "omniglot-5w1s-$a" omniglot --algorithm "$a" $OMNI --iterations 1500
done
# Reptile: 5 inner steps (alpha 0.4 chosen on validation over 1.0 after 300 iterations), and
# the same checkpoint evaluated after up to 10 steps.
OMP_NUM_THREADS=1 train omniglot-5w1s-reptile omniglot --algorithm reptile $OMNI \
  --iterations 1500 --inner-steps 5 --inner-lr 0.4
OMP_NUM_THREADS=1 metagrad eval results/algorithms/omniglot-5w1s-reptile \
  --data ../shared/data/omniglot --test-steps 0,1,3,5,10 --no-plots \
  --output results/algorithms/omniglot-5w1s-reptile-eval10
# Reptile with the reference code's 15-shot training tasks (1 shot at test; 2 threads, alone):
OMP_NUM_THREADS=2 train omniglot-5w1s-reptile-train15 omniglot --algorithm reptile $OMNI \
  --iterations 1500 --inner-steps 5 --inner-lr 0.4 --shots 15 --eval-shots 1 --test-steps 0,1,3,5,10
# MAML 5-way 5-shot, the same recipe (1 thread, next to another 1-thread job):
OMP_NUM_THREADS=1 train omniglot-5w5s-maml omniglot --shots 5 $OMNI --iterations 1500
# iMAML: 16 proximal SGD steps at 0.1, 5 CG steps, CG damping 1 (the reference code's default;
# without it lambda 2 diverged: pilots/5w1s-imaml-l2-d0-stopped.json), lambda 0.5 chosen on
# validation over 1 and 2 after 150-300 iterations (pilots/5w1s-imaml-l*-d1); 16 steps at test.
# 1 thread each, next to the 20-way iMAML run below (conv nets run iMAML's per-task loop).
OMP_NUM_THREADS=1 train omniglot-5w1s-imaml omniglot --algorithm imaml $OMNI --iterations 1500 \
  --inner-steps 16 --inner-lr 0.1 --imaml-lam 0.5 --cg-damping 1.0 --cg-steps 5 --test-steps 0,1,3,16

# Omniglot 20-way 1-shot: the 5-way protocol with 20 classes, 1 training query per class,
# 500 iterations, 0/1/5 test steps (MAML's row also 3). 1 thread each, two jobs side by side
# (FOMAML: 2 threads, alone).
O20="--data ../shared/data/omniglot --n-way 20 --meta-batch 8 --queries 1 --lr-schedule constant \
  --split 0.8,0.05,0.15 --val-every 250 --val-tasks 50 --iterations 500 --test-steps 0,1,5 \
  --no-progress --no-plots"
OMP_NUM_THREADS=1 train omniglot-20w1s-maml omniglot $O20 --test-steps 0,1,3,5
for a in fomaml metasgd anil mamlpp; do
  OMP_NUM_THREADS=1 train "omniglot-20w1s-$a" omniglot --algorithm "$a" $O20
done
OMP_NUM_THREADS=1 train omniglot-20w1s-reptile omniglot --algorithm reptile $O20 \
  --inner-steps 5 --inner-lr 0.4
OMP_NUM_THREADS=1 train omniglot-20w5s-maml omniglot --shots 5 $O20 --iterations 300
# iMAML 20-way: the 5-way iMAML settings (not re-tuned for 20 classes), 0/1/5/16 test steps.
OMP_NUM_THREADS=1 train omniglot-20w1s-imaml omniglot --algorithm imaml $O20 \
  --inner-steps 16 --inner-lr 0.1 --imaml-lam 0.5 --cg-damping 1.0 --cg-steps 5 --test-steps 0,1,5,16
# and with lambda 1 (the reference code's default; 2 threads, alone): validation picks it over 0.5
OMP_NUM_THREADS=2 train omniglot-20w1s-imaml-l1 omniglot --algorithm imaml $O20 \
  --inner-steps 16 --inner-lr 0.1 --imaml-lam 1.0 --cg-damping 1.0 --cg-steps 5 --test-steps 0,1,5,16
# and with CG damping 10, which makes the lambda-1 checkpoint's CG systems definite
# (imaml_curvature.py; 2 threads, alone, on the AMD EPYC: ~6.2 s an iteration)
OMP_NUM_THREADS=2 train omniglot-20w1s-imaml-d10 omniglot --algorithm imaml $O20 \
  --inner-steps 16 --inner-lr 0.1 --imaml-lam 1.0 --cg-damping 10.0 --cg-steps 5 --test-steps 0,1,5,16
# The CG system of -d10 up to a factor (110 I + H / 0.1 = 10 (11 I + H)) with a weak proximal
# term in the inner loop (lambda 0.1: 16 nearly plain SGD steps, like the reference code's
# unregularized inner loop), validated and tested without the proximal term (2 threads, alone)
OMP_NUM_THREADS=2 train omniglot-20w1s-imaml-l01 omniglot --algorithm imaml $O20 \
  --inner-steps 16 --inner-lr 0.1 --imaml-lam 0.1 --cg-damping 109 --cg-steps 5 \
  --imaml-eval-lam 0 --test-steps 0,1,5,16
# The reference code evaluates with --lam 0.0 (plain SGD at test): validation of every iMAML
# checkpoint with its lam and with 0 (imaml_eval_lam.py), then test rows of the 20-way runs whose
# recorded test used the other one (0 wins for -d10; the trained 0.1 wins for -l01, tested with 0)
OMP_NUM_THREADS=2 python results/algorithms/imaml_eval_lam.py
for r in omniglot-20w1s-imaml-d10:0 omniglot-20w1s-imaml-l01:0.1; do
  OMP_NUM_THREADS=2 metagrad eval "results/algorithms/${r%:*}" --data ../shared/data/omniglot \
    --imaml-eval-lam "${r#*:}" --no-plots --output "results/algorithms/${r%:*}-eval${r#*:}"
done

# 20-way with the MAML paper's inner loop (5 steps at 0.1 on the mean cross-entropy) at
# meta-batch 8 and at the paper's 16, the column's 500 iterations; 1 thread each, side by side.
O20REF="--data ../shared/data/omniglot --n-way 20 --queries 1 --lr-schedule constant \
  --split 0.8,0.05,0.15 --val-every 125 --val-tasks 50 --iterations 500 --test-steps 0,1,5 \
  --inner-steps 5 --inner-lr 0.1 --no-progress --no-plots"
OMP_NUM_THREADS=1 train omniglot-20w1s-maml-5step omniglot $O20REF --meta-batch 8
OMP_NUM_THREADS=1 train omniglot-20w1s-maml-ref omniglot $O20REF --meta-batch 16

# Data scaling: MAML 5-way 1-shot at 1,000 iterations on nested 50% / 75% subsets of the
# training characters (100%: results/omniglot-5w1s-time-to-accuracy/it-1000).
for f in 50 75; do
  OMP_NUM_THREADS=1 train "omniglot-5w1s-maml-train$f" omniglot $OMNI --iterations 1000 \
    --train-fraction "0.$f"
done

# iMAML on sinusoid: 16 proximal SGD steps; lambda and alpha chosen on validation (pilots in
# pilots/sinusoid-imaml-*: lambda 10 at alpha 0.005 best, 1.32 after 5 steps at 3,000
# iterations), then alpha halved and CG damped after the full run at the chosen setting
# diverged (README says how):
OMP_NUM_THREADS=1 train sinusoid-imaml sinusoid-quick --algorithm imaml --inner-steps 16 \
  --inner-lr 0.0025 --imaml-lam 10 --cg-damping 1 --nan-policy skip --test-steps 0,1,5,10,16 \
  --no-progress --no-plots
