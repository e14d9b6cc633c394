#!/usr/bin/env bash
# CIFAR-10 biased-pool benchmark (issue 11): FK against the modern baselines, the paper's SVHN
# protocol scaled to 2 CPU cores.
#
# Data: the CIFAR-10 JPEG archive of shared/data/cifar10 (see its README), unpacked once, then
# examples/make_biased_folders.py --source (any class-folder tree) builds val/ (VAL per class,
# default 300), test/ (the official 10k) and a class-layout pool of POOL_PER_CLASS (default
# 2,000) further training images per class; the simulation biases the pool itself (--imbalance R
# on --rare 5,...,9: dog, frog, horse, ship, truck by sorted folder name: 10,000 + 100 images at
# 100x), so one build serves every ratio.
# Protocol defaults: resnet10 L768, rotation-pretrained init (8 epochs), P = 50, B = 10, 30
# fine-tuning epochs (validation every 5), resnet10's batch 128 (on validation accuracy it beat
# 32 over 3 rounds of random: 21.6% vs 19.6%), seeds 0,1,2, 100x imbalance. One results
# folder per strategy and balance under OUT (resumable per round; run in pieces by naming
# strategies); each seed's rotation-pretrained model is made once and copied to the other
# strategies' folders (same pool, seed and epochs: the same weights).
#
#   bash benchmarks/run_cifar10.sh                          # every default strategy
#   BALANCE=reweight bash benchmarks/run_cifar10.sh fk badge
#   IMBALANCE=1 OUT=docs/results/cifar10-balanced bash benchmarks/run_cifar10.sh random fk
#   SMOKE=1 bash benchmarks/run_cifar10.sh random badge     # minutes on a CPU: 40 train / 10 test
#                                                           # images per class, 1 round, 1 epoch
#
# Knobs (environment): ARCHIVE, RAW, DATA, OUT, DEVICE (auto), SEEDS, ROUNDS, P, EPOCHS,
# BATCH, PRETRAIN_EPOCHS, INIT (pretrain|random), IMBALANCE, RARE, BALANCE
# (none|reweight|sample|auto), VAL (validation images per class), POOL_PER_CLASS, ALFK (the
# alfk command).
set -euo pipefail
cd "$(dirname "$0")/.."
archive=${ARCHIVE:-../shared/data/cifar10/cifar10-jpg.tar.gz}
raw=${RAW:-/tmp/cifar10-raw}
balance=${BALANCE:-none}
alfk=${ALFK:-alfk}

if [ ! -d "$raw/cifar10/train" ]; then
  [ -f "$archive" ] || { echo "error: no CIFAR-10 archive at $archive (set ARCHIVE)" >&2; exit 1; }
  mkdir -p "$raw"
  tar -xzf "$archive" -C "$raw"
fi
source_dir="$raw/cifar10"
if [ "${SMOKE:-0}" = 1 ]; then  # a tiny class-folder tree cut from the real one
  source_dir="$raw/cifar10-smoke"
  if [ ! -d "$source_dir" ]; then
    for split in train test; do
      n=$([ "$split" = train ] && echo 40 || echo 10)
      for d in "$raw/cifar10/$split"/*/; do
        c=$(basename "$d"); mkdir -p "$source_dir/$split/$c"
        mapfile -t files < <(find "$d" -name '*.jpg' | sort)
        cp "${files[@]:0:$n}" "$source_dir/$split/$c/"
      done
    done
  fi
  data=${DATA:-/tmp/cifar10-smoke-folders}
  out=${OUT:-/tmp/cifar10-smoke-results}
  : "${ROUNDS:=1}" "${P:=10}" "${EPOCHS:=1}" "${PRETRAIN_EPOCHS:=1}" "${INIT:=random}"
  : "${SEEDS:=0}" "${VAL:=10}" "${IMBALANCE:=4}" "${POOL_PER_CLASS:=30}"
else
  data=${DATA:-/tmp/cifar10-folders}
  out=${OUT:-docs/results/cifar10}
fi
[ -d "$data/val" ] || python examples/make_biased_folders.py --source "$source_dir" --out "$data" \
  --imbalance 1 --pool-layout classes --val-per-class "${VAL:-300}" \
  --pool-per-class "${POOL_PER_CLASS:-2000}" --workers 1

suffix=""; [ "$balance" = none ] || suffix="-$balance"
common=(--pool "$data/unlabeled" --val "$data/val" --test "$data/test"
        --rounds "${ROUNDS:-10}" --P "${P:-50}" --seeds "${SEEDS:-0,1,2}" ${BATCH:+--batch-size "$BATCH"}
        --arch resnet10 --taps L768 --init "${INIT:-pretrain}" --epochs "${EPOCHS:-30}"
        --pretrain-epochs "${PRETRAIN_EPOCHS:-8}" --eval-every 5 --device "${DEVICE:-auto}"
        --imbalance "${IMBALANCE:-100}" --rare "${RARE:-5,6,7,8,9}" --balance "$balance" --no-plot)
strategies=("$@")
[ ${#strategies[@]} -gt 0 ] || strategies=(random entropy balanced-entropy badge similar coreset fk:p_yz_knn::sample fk:p_yz::kcenter fk:true::kcenter)
for s in "${strategies[@]}"; do
  dest="$out$suffix/${s//:/-}"
  mkdir -p "$dest/cache"
  for f in "$out$suffix"/*/cache/pretrain_seed*.pt; do  # made once per seed, by the first run
    [ -f "$f" ] && [ ! -f "$dest/cache/$(basename "$f")" ] && cp "$f" "$dest/cache/"
  done
  "$alfk" simulate "${common[@]}" --strategies "$s" --out "$dest"
done
echo "results under $out$suffix/; plot with: $alfk plot --results $out$suffix/STRATEGY ..." >&2
