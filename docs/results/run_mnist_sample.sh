#!/usr/bin/env bash
# Folders named fk-p_yz, fk-true, fk-yhat, fk-p_yz-product (and pcc) were made when kcenter was
# the only centre rule: they are the ::kcenter spellings below. alfk's default fk is
# fk:p_yz_knn:sum:sample (docs/benchmarks.md §4).
# The bundled-MNIST reproduction of the paper's biased-data experiment, scaled down in proportion.
# Paper (MNIST): 50k balanced pool -> 100x imbalance on 5-9 -> 25,250 images, P=125, B=10.
# Here: the 8,000-digit sample -> val 100/class, test 100/class, pool 600/class (6,000);
# 100x imbalance -> 3,000 + 30 images; P = 125 * 3,030 / 25,250 ~ 15; B = 10; seeds 0,1,2.
# Cost cut: validation every 5 of the 50 fine-tuning epochs (--eval-every 5).
set -euo pipefail
cd "$(dirname "$0")/../.."
data=${DATA:-/tmp/mnist-sample-sim}
python examples/make_biased_folders.py --out "$data" --force --val-per-class 100 --test-per-class 100 \
  --labeled-per-class 0 --imbalance 1 --pool-layout classes
common=(--pool "$data/unlabeled" --val "$data/val" --test "$data/test" --rounds 10 --P 15 --seeds 0,1,2
        --arch lenet --taps L80 --init pretrain --epochs 50 --eval-every 5 --mc-samples 32 --device cpu)
alfk simulate "${common[@]}" --imbalance 100 --rare 5,6,7,8,9 \
  --strategies random,entropy,varR,coreset,pcc,fk:yhat::kcenter,fk:p_yz::kcenter,fk:p_yz:product:kcenter,fk:true::kcenter,fk:p_yz_knn::sample \
  --out docs/results/mnist-sample-100x
alfk simulate "${common[@]}" --imbalance 1 --strategies random,fk:p_yz::kcenter,fk:p_yz_knn::sample --out docs/results/mnist-sample-balanced
