"""Baseline acquisition strategies against plain-loop references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from alfk_cli.data.decode import normalizer
from alfk_cli.data.inputspec import InputSpec
from alfk_cli.errors import AlfkError
from alfk_cli.models.archs import build_model, get_arch
from alfk_cli.models.nets import TapNet
from alfk_cli.strategies import baselines as st


def _probs(rng, shape, zeros=True):
    p = rng.random(shape) ** 3
    if zeros:
        p[rng.random(shape) < 0.2] = 0.0
    p[..., 0] += 1e-3  # no all-zero rows
    return p / p.sum(axis=-1, keepdims=True)


# --- references ----------------------------------------------------------------------------------


def ref_entropy(row):
    return -sum(q * math.log(q) for q in row if q > 0)


def ref_margin(row):
    s = sorted(row, reverse=True)
    return -(s[0] - s[1])


def ref_variation_ratio(samples):  # samples: [K][D] for one row
    counts = {}
    for s in samples:
        c = max(range(len(s)), key=lambda j: (s[j], -j))  # first max, as argmax
        counts[c] = counts.get(c, 0) + 1
    return 1.0 - max(counts.values()) / len(samples)


def ref_bald(samples):
    k, d = len(samples), len(samples[0])
    mean = [sum(samples[i][j] for i in range(k)) / k for j in range(d)]
    return ref_entropy(mean) - sum(ref_entropy(s) for s in samples) / k


def ref_coreset(x, labelled, P, available):
    n = len(x)
    dist = np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1))
    centres = [i for i in range(n) if labelled[i]]
    picked = []
    if not centres:
        avail = [i for i in range(n) if available[i]]
        mean = x[avail].mean(axis=0)
        first = min(avail, key=lambda i: (np.sqrt(((x[i] - mean) ** 2).sum()), i))
        picked.append(first)
        centres.append(first)
    while len(picked) < P:
        best_i, best_d = None, -1.0
        for i in range(n):
            if not available[i] or i in picked:
                continue
            d = min(dist[i, c] for c in centres)
            if d > best_d:  # strict: ties keep the smaller row
                best_i, best_d = i, d
        picked.append(best_i)
        centres.append(best_i)
    return picked


# --- scores --------------------------------------------------------------------------------------


def test_entropy_and_margin_match_loops():
    rng = np.random.default_rng(0)
    p = _probs(rng, (50, 7))
    p[3] = 0.0
    p[3, 2] = 1.0  # a certain row: 0·log 0 must count as 0
    h = st.entropy(p)
    assert h.shape == (50,)
    np.testing.assert_allclose(h, [ref_entropy(r) for r in p], rtol=1e-12, atol=1e-15)
    assert h[3] == 0.0
    np.testing.assert_allclose(st.margin(p), [ref_margin(r) for r in p], rtol=1e-12, atol=1e-15)
    uniform = np.full((1, 4), 0.25)
    np.testing.assert_allclose(st.entropy(uniform), [math.log(4)])
    assert st.margin(uniform)[0] == 0.0


def test_variation_ratio_and_bald_match_loops():
    rng = np.random.default_rng(1)
    mc = _probs(rng, (9, 40, 5)).astype(np.float32)
    vr = st.variation_ratio(mc)
    assert vr.shape == (40,)
    ref = [ref_variation_ratio(mc[:, i].tolist()) for i in range(40)]
    np.testing.assert_allclose(vr, ref, rtol=0, atol=1e-12)
    b = st.bald(mc)
    mc64 = mc.astype(np.float64)
    np.testing.assert_allclose(b, [ref_bald(mc64[:, i].tolist()) for i in range(40)], atol=1e-10)
    assert (b > -1e-12).all()
    # identical samples: no disagreement at all
    same = np.repeat(mc[:1], 6, axis=0)
    np.testing.assert_allclose(st.bald(same), 0.0, atol=1e-7)
    assert (st.variation_ratio(same) == 0).all()


def test_variation_ratio_counts_by_hand():
    # K=4 samples of 2 rows, D=3: row 0 votes 0,0,1,2 -> 1 - 2/4; row 1 votes 2,2,2,2 -> 0
    e = np.eye(3)
    mc = np.stack([np.stack([e[a], e[b]]) for a, b in [(0, 2), (0, 2), (1, 2), (2, 2)]])
    np.testing.assert_allclose(st.variation_ratio(mc), [0.5, 0.0])


# --- row pickers ---------------------------------------------------------------------------------


def test_top_p_order_and_ties():
    scores = np.array([0.5, 0.9, 0.5, 0.1, 0.9, 0.7, 0.5])
    avail = np.array([True, True, True, True, False, True, True])
    np.testing.assert_array_equal(st.top_p(scores, 4, avail), [1, 5, 0, 2])
    np.testing.assert_array_equal(st.top_p(scores, 6, avail), [1, 5, 0, 2, 6, 3])
    out = st.top_p(scores, 0, avail)
    assert out.dtype == np.int64 and out.size == 0
    assert st.top_p(scores, 2, np.ones(7, bool)).dtype == np.int64
    with pytest.raises(AlfkError):
        st.top_p(scores, 7, avail)


def test_top_p_matches_sorted_loop():
    rng = np.random.default_rng(2)
    scores = rng.integers(0, 5, 200).astype(np.float64)  # many ties
    avail = rng.random(200) < 0.6
    ref = sorted((i for i in range(200) if avail[i]), key=lambda i: (-scores[i], i))[:30]
    np.testing.assert_array_equal(st.top_p(scores, 30, avail), ref)


def test_random_rows_deterministic_distinct_available():
    avail = np.zeros(100, bool)
    avail[::3] = True
    a = st.random_rows(20, avail, seed=5)
    b = st.random_rows(20, avail, seed=5)
    c = st.random_rows(20, avail, seed=6)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.dtype == np.int64 and len(set(a.tolist())) == 20 and avail[a].all()
    assert (
        sorted(st.random_rows(int(avail.sum()), avail, 0).tolist())
        == np.flatnonzero(avail).tolist()
    )
    with pytest.raises(AlfkError):
        st.random_rows(35, avail, 0)


@pytest.mark.parametrize("with_labelled", [True, False])
def test_coreset_matches_full_matrix_loop(with_labelled):
    rng = np.random.default_rng(3)
    n = 60
    x = rng.standard_normal((n, 4)).astype(np.float32)
    labelled = np.zeros(n, bool)
    if with_labelled:
        labelled[rng.choice(n, 6, replace=False)] = True
    available = ~labelled
    available[rng.choice(n, 10, replace=False)] = False
    got = st.coreset_rows(x, labelled, 15, available)
    ref = ref_coreset(x.astype(np.float64), labelled, 15, available)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, ref)
    assert available[got].all() and len(set(got.tolist())) == 15
    with pytest.raises(AlfkError):
        st.coreset_rows(x, labelled, int(available.sum()) + 1, available)


def test_coreset_ties_and_duplicates():
    # points on a line; duplicates at distance 0 are never picked twice, ties go to smaller rows
    x = np.array([[0.0], [2.0], [-2.0], [0.0], [0.0]])
    labelled = np.array([True, False, False, False, False])
    avail = ~labelled
    np.testing.assert_array_equal(st.coreset_rows(x, labelled, 4, avail), [1, 2, 3, 4])
    # no labelled rows: start from the row closest to the mean (0), ties to the smaller row
    got = st.coreset_rows(x, np.zeros(5, bool), 3, np.ones(5, bool))
    np.testing.assert_array_equal(got, [0, 1, 2])


# --- MC dropout ----------------------------------------------------------------------------------

LENET = get_arch("lenet").input


def _images(n, spec, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(
        0, 256, (n, spec.channels, spec.size, spec.size), dtype=torch.uint8, generator=g
    )


def test_mc_dropout_lenet_samples_differ_and_seed_reproduces():
    model = build_model("lenet", 10, seed=0)
    model.train()
    imgs = _images(23, LENET)
    before = torch.get_rng_state()
    a = st.mc_dropout_probs(model, imgs, LENET, K=4, seed=7, device="cpu", batch_size=10)
    assert torch.equal(before, torch.get_rng_state())  # the caller's RNG is left alone
    assert all(m.training for m in model.modules())  # flags restored
    assert a.shape == (4, 23, 10) and a.dtype == np.float32
    np.testing.assert_allclose(a.sum(-1), 1.0, atol=1e-5)
    for i in range(4):
        for j in range(i + 1, 4):
            assert not np.allclose(a[i], a[j])
    b = st.mc_dropout_probs(model, imgs, LENET, K=4, seed=7, device="cpu", batch_size=10)
    np.testing.assert_array_equal(a, b)
    c = st.mc_dropout_probs(model, imgs, LENET, K=4, seed=8, device="cpu", batch_size=10)
    assert not np.allclose(a, c)


def test_mc_dropout_with_zero_rate_is_eval_output():
    model = build_model("lenet", 10, seed=1)
    for m in model.modules():
        if isinstance(m, nn.Dropout | nn.Dropout2d):
            m.p = 0.0
    imgs = _images(17, LENET, seed=1)
    mc = st.mc_dropout_probs(model, imgs, LENET, K=3, seed=0, device="cpu", batch_size=8)
    model.eval()
    with torch.no_grad():
        ref = torch.softmax(model(normalizer(LENET)(imgs)), dim=1).numpy()
    for k in range(3):
        np.testing.assert_allclose(mc[k], ref, rtol=1e-5, atol=1e-6)


def test_mc_dropout_keeps_batchnorm_in_eval():
    spec = InputSpec(8, 1, (0.5,), (0.5,))
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(4)
    drop = nn.Dropout(0.5)
    model = TapNet(
        [("a", nn.Sequential(nn.Conv2d(1, 4, 3), bn, nn.ReLU()))],
        nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), drop),
        nn.Linear(4, 3),
    )
    model.train()
    seen = []
    bn.register_forward_pre_hook(lambda m, _: seen.append(("bn", m.training)))
    drop.register_forward_pre_hook(lambda m, _: seen.append(("drop", m.training)))
    stats = (bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked))
    out = st.mc_dropout_probs(model, _images(5, spec), spec, K=2, seed=0, device="cpu")
    assert out.shape == (2, 5, 3)
    assert ("bn", False) in seen and ("drop", True) in seen
    assert ("bn", True) not in seen and ("drop", False) not in seen
    assert torch.equal(bn.running_mean, stats[0]) and torch.equal(bn.running_var, stats[1])
    assert int(bn.num_batches_tracked) == stats[2]
    assert bn.training and drop.training  # restored


def test_mc_dropout_needs_dropout():
    spec = get_arch("resnet10").input
    model = build_model("resnet10", 10, seed=0)
    with pytest.raises(AlfkError, match="dropout"):
        st.mc_dropout_probs(model, _images(2, spec), spec, K=2, seed=0, device="cpu")


def test_what_a_strategy_tells_the_score_stage():
    """The cache key's strategy fields and where a strategy runs under torchrun come from the
    strategy (``key_fields``, ``every_rank``), not from reading its attributes."""
    from alfk_cli.strategies.registry import make_strategy

    fk = make_strategy("fk:p_yz:product:kcenter")
    assert fk.key_fields() == {"estimator": "p_yz", "kernel": "product"} and fk.every_rank
    assert make_strategy("fk:yhat:sum:class").key_fields() == {
        "estimator": "yhat",
        "kernel": "sum",
        "centers": "class",
    }
    assert make_strategy("pcc").key_fields() == {"estimator": "p_yz", "kernel": "pcc"}
    entropy = make_strategy("entropy")
    assert entropy.key_fields() == {"estimator": None, "kernel": None} and not entropy.every_rank


def test_a_fisher_kernel_strategy_needs_a_round_that_runs_the_search():
    """``fisher`` is not part of the generic RoundData: a round without it serves every other
    strategy, and ``fk`` says what it misses in one line."""
    from alfk_cli.strategies.registry import make_strategy

    class Plain:
        available = np.ones(5, dtype=bool)
        labelled = np.zeros(5, dtype=bool)
        num_classes, n_val, mc_samples = 2, 3, 2

        def probs(self, rows):
            return np.tile([0.3, 0.7], (len(rows), 1))

    assert len(make_strategy("entropy").choose(Plain(), 2, 0).rows) == 2
    with pytest.raises(AlfkError, match="fk needs a round that runs the Fisher-kernel search"):
        make_strategy("fk").choose(Plain(), 2, 0)
