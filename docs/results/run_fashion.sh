#!/usr/bin/env bash
# Folders named fk-p_yz, fk-true, fk-yhat, fk-p_yz-product (and pcc) were made when kcenter was
# the only centre rule: they are the ::kcenter spellings below. alfk's default fk is
# fk:p_yz_knn:sum:sample (docs/benchmarks.md §4).
# The paper's MNIST biased-data protocol on Fashion-MNIST (Debian's dataset-fashion-mnist):
# 60k train -> 10k validation (1,000/class) + 50k pool; test = the official 10k; 100x imbalance on
# classes 5-9 (pool 25,000 + 250); LeNet L80; P = 125; B = 10; rotation-pretrained init; seeds 0-2.
# One output folder per strategy (resumable per round), run in priority order; pass strategy
# names as arguments to run a subset. Cost cut: validation every 5 of the 50 fine-tuning epochs.
# BALANCE=reweight|sample|auto trains class-balanced (issue 11) into fashion-100x-$BALANCE/;
# SEEDS=0 runs fewer seeds.
set -euo pipefail
cd "$(dirname "$0")/../.."
data=${DATA:-/tmp/fsim}
[ -d "$data/val" ] || python examples/make_biased_folders.py --source fashion-mnist --out "$data" \
  --imbalance 1 --pool-layout classes
balance=${BALANCE:-none}
suffix=""; [ "$balance" = none ] || suffix="-$balance"
common=(--pool "$data/unlabeled" --val "$data/val" --test "$data/test" --rounds 10 --P 125 --seeds "${SEEDS:-0,1,2}"
        --balance "$balance"
        --arch lenet --taps L80 --init pretrain --epochs 50 --eval-every 5 --mc-samples 32 --device "${DEVICE:-cpu}"
        --rare 5,6,7,8,9 --no-plot)
strategies=("$@")
[ ${#strategies[@]} -gt 0 ] || strategies=(random fk:p_yz_knn::sample fk:p_yz::kcenter varR entropy coreset fk:true::kcenter pcc fk:yhat::kcenter fk:p_yz:product:kcenter)
for s in "${strategies[@]}"; do
  alfk simulate "${common[@]}" --imbalance 100 --strategies "$s" --out "docs/results/fashion-100x$suffix/${s//:/-}"
done
[ "$balance" = none ] || exit 0
for s in random fk:p_yz_knn::sample fk:p_yz::kcenter; do
  alfk simulate "${common[@]}" --imbalance 1 --strategies "$s" --out "docs/results/fashion-balanced/${s//:/-}"
done
