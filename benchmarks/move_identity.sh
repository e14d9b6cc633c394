#!/usr/bin/env bash
# Byte identity across a refactor (issue 20's move into subpackages): run the same fixed-seed
# commands with two commits of alfk on the same small folder and compare what they wrote.
#
#   benchmarks/move_identity.sh BEFORE AFTER [WORK]   # run both commits, then compare
#   benchmarks/move_identity.sh run COMMIT OUT [WORK] # run one commit; its outputs into OUT
#   benchmarks/move_identity.sh compare OUT_A OUT_B   # compare two runs' outputs
#
# Each commit is checked out into a temporary git worktree and run with the current Python
# (PYTHONPATH at that worktree), from the same scratch folder WORK/run (default WORK:
# /tmp/alfk_move_identity), so that the paths the outputs record are equal. The inputs are a
# folder made once by examples/make_biased_folders.py from the bundled MNIST sample (60 val,
# 60 labelled, 120 pool images). The commands: pretrain, train (from the pretrained model),
# embed val and pool, score (fk and badge), select (txt, with the ledger) and select --format
# jsonl --no-ledger; CPU, --seed 0, --workers 0. compare: every dataset and attribute of each
# HDF5 file (except times), every tensor and metadata entry of each checkpoint, the other files
# byte for byte (benchmarks/compare_outputs.py). Takes about a minute per commit on 2 cores.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
PY=${PYTHON:-python}

run_commit() {  # COMMIT OUT WORK
    local commit=$1 out=$2 work=$3
    local tree="$work/tree" data="$work/data" scratch="$work/run"
    mkdir -p "$work"
    if [ ! -d "$data" ]; then
        "$PY" "$REPO/examples/make_biased_folders.py" --out "$data" --val-per-class 6 \
            --test-per-class 0 --labeled-per-class 6 --pool-per-class 16 --imbalance 2 \
            --workers 1 --force >/dev/null
    fi
    git -C "$REPO" worktree remove --force "$tree" 2>/dev/null || rm -rf "$tree"
    git -C "$REPO" worktree add --detach "$tree" "$commit" >/dev/null 2>&1
    rm -rf "$scratch" && mkdir -p "$scratch"
    (
        cd "$scratch"
        export PYTHONPATH="$tree" CUDA_VISIBLE_DEVICES=""
        alfk() { "$PY" -m alfk_cli "$@"; }
        common=(--seed 0 --device cpu --workers 0 --quiet)
        alfk pretrain --images "$data/unlabeled" --out pre.pt --epochs 2 "${common[@]}"
        alfk train --data "$data/labeled" --val "$data/val" --init pre.pt --out model.pt \
            --epochs 2 "${common[@]}"
        alfk embed --model model.pt --images "$data/val" --out val.h5 "${common[@]}"
        alfk embed --model model.pt --images "$data/unlabeled" --reference val.h5 --out pool.h5 \
            "${common[@]}"
        alfk score --val val.h5 --pool pool.h5 --P 12 --out scores.h5 "${common[@]}"
        alfk score --val val.h5 --pool pool.h5 --P 12 --strategy badge --out badge.h5 \
            "${common[@]}"
        alfk select --val "$data/val" --pool "$data/unlabeled" --model model.pt --workdir wd \
            --P 10 "${common[@]}" >select.txt
        alfk select --val "$data/val" --pool "$data/unlabeled" --model model.pt --workdir wd \
            --P 10 --format jsonl --no-ledger "${common[@]}" >select-next.jsonl
        git -C "$tree" rev-parse HEAD >commit.txt
    )
    rm -rf "$out" && mkdir -p "$(dirname "$out")" && cp -a "$scratch" "$out"
    git -C "$REPO" worktree remove --force "$tree"
    echo "$commit: outputs in $out"
}

compare() {  # OUT_A OUT_B
    PYTHONPATH="$REPO" "$PY" "$HERE/compare_outputs.py" "$1" "$2"
}

case "${1:-}" in
    run) run_commit "$2" "$3" "${4:-/tmp/alfk_move_identity}" ;;
    compare) compare "$2" "$3" ;;
    ""|-h|--help) sed -n '2,17p' "$0"; exit 2 ;;
    *)
        work=${3:-/tmp/alfk_move_identity}
        run_commit "$1" "$work/before" "$work"
        run_commit "$2" "$work/after" "$work"
        compare "$work/before" "$work/after"
        ;;
esac
