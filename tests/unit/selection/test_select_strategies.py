"""``alfk select --strategy`` with every built-in baseline, against brute-force references
computed from the feature store the run left in the work folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from alfk_cli.models.archs import build_model
from alfk_cli.models.checkpoint import save_checkpoint
from alfk_cli.store.reader import open_store
from conftest import make_labelled, write_images

P = 6


@pytest.fixture
def world(tmp_path, monkeypatch):
    """val/ (3 classes × 4), a pool of 40 images, a task checkpoint for the 3 classes."""
    monkeypatch.chdir(tmp_path)
    make_labelled(Path("val"), ["a", "b", "c"], 4)
    write_images(Path("pool"), 40, seed=10)
    save_checkpoint("model.pt", build_model("lenet", 3, seed=0), "lenet", ["a", "b", "c"])
    Path("sent.txt").write_text("pool/img0003.png\npool/img0017.png\n")
    return tmp_path


def _select(cli, *args: str) -> list[str]:
    r = cli("select", "--val", "val", "--pool", "pool", "--P", str(P), "--model", "model.pt",
            "--device", "cpu", "--workers", "0", "--exclude", "sent.txt", "--no-ledger", *args)  # fmt: skip
    assert r.exit_code == 0, r.stderr
    return r.stdout.splitlines()


def _store():
    with open_store(".alfk/pool/pool.h5") as s:
        return s.paths, s.logits[:].astype(np.float64), s.z[:].astype(np.float64)


def _available(paths: list[str]) -> np.ndarray:
    sent = {"img0003.png", "img0017.png"}
    return np.array([p not in sent for p in paths])


def _top(scores: np.ndarray, available: np.ndarray) -> list[int]:
    rows = [i for i in range(len(scores)) if available[i]]
    return sorted(rows, key=lambda i: (-scores[i], i))[:P]


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_entropy_and_margin_pick_the_most_uncertain_available_images(cli, world):
    for strategy in ("entropy", "margin"):
        printed = _select(cli, "--strategy", strategy)
        paths, logits, _ = _store()
        p = _softmax(logits)
        if strategy == "entropy":
            scores = -(p * np.log(p)).sum(axis=1)
        else:
            two = np.sort(p, axis=1)[:, -2:]
            scores = two[:, 0] - two[:, 1]
        expected = _top(scores, _available(paths))
        assert printed == [f"pool/{paths[i]}" for i in expected]


def test_random_draws_from_the_available_images_only_and_repeats_with_the_seed(cli, world):
    first = _select(cli, "--strategy", "random", "--seed", "3")
    paths, _, _ = _store()
    avail = np.flatnonzero(_available(paths))
    expected = np.random.default_rng(3).choice(avail, size=P, replace=False)
    assert first == [f"pool/{paths[i]}" for i in expected]
    assert _select(cli, "--strategy", "random", "--seed", "3") == first
    assert _select(cli, "--strategy", "random", "--seed", "4") != first


def test_coreset_starts_from_the_images_already_sent(cli, world):
    printed = _select(cli, "--strategy", "coreset")
    paths, _, z = _store()
    avail = _available(paths)
    centres = [z[i] for i in np.flatnonzero(~avail)]
    picked: list[int] = []
    for _ in range(P):  # farthest-first, ties to the smaller row, from the sent images
        dist = [
            min(float(((z[i] - c) ** 2).sum()) for c in centres) if avail[i] and i not in picked
            else -1.0
            for i in range(len(z))
        ]  # fmt: skip
        nxt = int(np.argmax(dist))
        picked.append(nxt)
        centres.append(z[nxt])
    assert printed == [f"pool/{paths[i]}" for i in picked]


def test_mc_dropout_strategies_run_the_model_and_are_deterministic(cli, world):
    for strategy in ("varR", "bald"):
        first = _select(cli, "--strategy", strategy, "--mc-samples", "4")
        assert len(set(first)) == P and not {"pool/img0003.png", "pool/img0017.png"} & set(first)
        assert _select(cli, "--strategy", strategy, "--mc-samples", "4") == first
    # score works from the stores alone: varR needs the checkpoint for its passes
    wd = Path(".alfk/pool")
    r = cli("score", "--val", wd / "val.h5", "--pool", wd / "pool.h5", "--P", "3", "--out",
            "s.h5", "--strategy", "varR", "--device", "cpu")  # fmt: skip
    assert r.exit_code == 1 and "give the checkpoint" in r.stderr and "Traceback" not in r.stderr
    r = cli("score", "--val", wd / "val.h5", "--pool", wd / "pool.h5", "--P", "3", "--out",
            "s.h5", "--strategy", "varR", "--model", "model.pt", "--device", "cpu",
            "--workers", "0", "--mc-samples", "4")  # fmt: skip
    assert r.exit_code == 0, r.stderr
    assert "selected 3 images by varR" in r.stderr


def test_fisher_kernel_names_and_options_agree(cli, world):
    default = _select(cli)  # fk: p_yz_knn pseudo-labels, the sum kernel, sample centres
    assert _select(cli, "--strategy", "fk:p_yz_knn:sum:sample") == default
    assert _select(cli, "--strategy", "fk::sum") == default
    assert _select(cli, "--strategy", "fk", "--kernel", "product") == _select(
        cli, "--strategy", "fk:p_yz_knn:product:sample"
    )
    paper = _select(cli, "--strategy", "fk:p_yz:sum:kcenter")
    assert _select(cli, "--strategy", "fk:p_yz::kcenter") == paper
    assert _select(cli, "--strategy", "fk::sum:kcenter", "--pseudo-label", "p_yz") == paper
    # a strategy with another estimator re-embeds the pool with it
    _select(cli, "--strategy", "fk:yhat")
    with open_store(".alfk/pool/pool.h5") as s:
        assert s.pseudo_label == "yhat"
    soft = _select(cli, "--strategy", "fk:p_yz_knn::class")
    assert len(set(soft)) == P and not {"pool/img0003.png", "pool/img0017.png"} & set(soft)
    with open_store(".alfk/pool/pool.h5") as s:
        assert s.pseudo_label == "p_yz_knn"
    r = cli("select", "--val", "val", "--pool", "pool", "--P", "3", "--model", "model.pt",
            "--strategy", "fk:p_yz:sum:nearest", "--no-ledger")  # fmt: skip
    assert r.exit_code == 2 and "unknown centre rule 'nearest'" in r.stderr
    csv = _select(cli, "--strategy", "entropy", "--format", "csv")
    assert csv[0] == "path,rank,score,predicted,center" and csv[1].endswith(",")
