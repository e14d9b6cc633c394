"""BADGE, SIMILAR (FLQMI, GCMI) and class-balanced entropy against brute-force references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from alfk_cli.errors import AlfkError
from alfk_cli.models.archs import build_model, get_arch, penultimate_tap
from alfk_cli.simulate.folderround import last_layer_of
from alfk_cli.strategies import badge, baselines, similar
from alfk_cli.strategies.quotas import class_quotas


def _probs(rng, n, d):
    p = rng.random((n, d)) ** 3 + 1e-3
    return p / p.sum(axis=1, keepdims=True)


# --- gradient embeddings -------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [False, True])
def test_grad_embedding_is_the_autograd_last_layer_gradient_at_the_argmax(bias):
    g = torch.Generator().manual_seed(0)
    n, F_, D = 7, 5, 4
    a = torch.randn(n, F_, generator=g, dtype=torch.float64)
    W = torch.randn(D, F_, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(D, generator=g, dtype=torch.float64, requires_grad=True)
    probs = torch.softmax(a @ W.T + b, 1).detach().numpy()
    emb = badge.grad_embedding(probs, a.numpy(), bias=bias).dense()
    for i in range(n):
        logits = a[i] @ W.T + b
        y = int(logits.argmax())
        gW, gb = torch.autograd.grad(F.cross_entropy(logits[None], torch.tensor([y])), (W, b))
        want = torch.cat([gW, gb[:, None]], 1) if bias else gW
        np.testing.assert_allclose(emb[i], want.flatten().numpy(), atol=1e-12)
    # at a given label instead of the prediction
    y = np.arange(n) % D
    emb = badge.grad_embedding(probs, a.numpy(), y).dense()
    gW = torch.autograd.grad(F.cross_entropy(a[2:3] @ W.T + b, torch.tensor([y[2]])), W)[0]
    np.testing.assert_allclose(emb[2], gW.flatten().numpy(), atol=1e-12)


@pytest.mark.parametrize("arch", ["lenet", "resnet10"])
def test_last_layer_features_are_the_classifier_input_and_a_pooled_tap(arch):
    spec = get_arch(arch)
    model = build_model(arch, 3, seed=1).eval()
    size, ch = spec.input.size, spec.input.channels
    x = torch.randint(0, 256, (5, ch, size, size), generator=torch.Generator().manual_seed(2))
    x = x.to(torch.uint8)
    probs, feats = last_layer_of(model, [x[:3], x[3:]], spec.input, torch.device("cpu"))
    from alfk_cli.data.decode import normalizer
    from alfk_cli.models.nets import pool

    xn = normalizer(spec.input)(x)
    with torch.no_grad():
        logits, (tap,) = model.forward_taps(xn, (penultimate_tap(arch),))
    np.testing.assert_allclose(probs, torch.softmax(logits, 1).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(feats, pool(tap).numpy(), rtol=1e-5, atol=1e-6)
    # BADGE's embedding of the network equals autograd of the loss w.r.t. the classifier weights
    emb = badge.grad_embedding(probs, feats).dense()
    for i in range(len(x)):
        model.zero_grad()
        out = model(xn[i : i + 1])
        F.cross_entropy(out, out.argmax(1)).backward()
        want = model.classifier.weight.grad.flatten().numpy()
        np.testing.assert_allclose(emb[i], want, rtol=1e-4, atol=1e-6)


def test_penultimate_tap_of_each_architecture():
    assert penultimate_tap("lenet") == "fc1"
    assert penultimate_tap("resnet10") == "layer4"
    assert penultimate_tap("resnet18") == "layer4"


# --- k-means++ -----------------------------------------------------------------------------------


def ref_kmeanspp(X, P, seed):
    """BADGE's init_centers on dense vectors, with one uniform draw per pick."""
    rng = np.random.default_rng(seed)
    n = len(X)
    norms = [math.sqrt(sum(v * v for v in row)) for row in X]
    picked = [max(range(n), key=lambda i: (norms[i], -i))]
    while len(picked) < P:
        w = []
        for i in range(n):
            d = min(float(np.sqrt(((X[i] - X[c]) ** 2).sum())) for c in picked)
            w.append(0.0 if i in picked else d * d)
        u = rng.random() * sum(w)
        acc = 0.0
        for i, wi in enumerate(w):
            acc += wi
            if acc > u:
                picked.append(i)
                break
    return picked


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kmeanspp_matches_dense_reference_draw_for_draw(seed):
    rng = np.random.default_rng(seed)
    probs, feats = _probs(rng, 40, 4), rng.normal(size=(40, 6)).astype(np.float32)
    emb = badge.grad_embedding(probs, feats)
    got = badge.kmeanspp_rows(emb, 12, seed)
    assert got.tolist() == ref_kmeanspp(emb.dense(), 12, seed)


def test_kmeanspp_properties_duplicates_and_seeds():
    rng = np.random.default_rng(5)
    probs, feats = _probs(rng, 10, 3), rng.normal(size=(10, 4))
    probs, feats = np.repeat(probs, 3, axis=0), np.repeat(feats, 3, axis=0)  # each row 3 times
    emb = badge.grad_embedding(probs, feats)
    first = badge.kmeanspp_rows(emb, 10, 0)
    # weight 0 at a chosen row and its copies: ten picks from ten distinct points
    assert len(set((first // 3).tolist())) == 10
    assert first[0] == int(np.argmax(emb.sq_norms()))
    everything = badge.kmeanspp_rows(emb, 30, 0)  # past the distinct points: uniform draws
    assert sorted(everything.tolist()) == list(range(30))
    assert np.array_equal(badge.kmeanspp_rows(emb, 10, 0), first)
    assert any(not np.array_equal(badge.kmeanspp_rows(emb, 10, s), first) for s in (1, 2, 3))
    with pytest.raises(AlfkError):
        badge.kmeanspp_rows(emb, 31, 0)


# --- SIMILAR -------------------------------------------------------------------------------------


def ref_sim(X, Q):
    out = np.zeros((len(X), len(Q)))
    for i, x in enumerate(X):
        for j, q in enumerate(Q):
            nx, nq = np.linalg.norm(x), np.linalg.norm(q)
            cos = float(x @ q) / (nx * nq) if nx > 0 and nq > 0 else 0.0
            out[i, j] = (1 + cos) / 2
    return out


def ref_flqmi(S, A, eta):
    if not A:
        return 0.0
    return sum(max(S[a, q] for a in A) for q in range(S.shape[1])) + eta * sum(max(S[a]) for a in A)


def ref_gcmi(S, A):
    return 2.0 * sum(S[a].sum() for a in A)


def ref_greedy(S, P, f):
    A: list[int] = []
    gains = []
    for _ in range(P):
        best, best_gain = None, -np.inf
        for i in range(len(S)):
            if i in A:
                continue
            gain = f(S, [*A, i]) - f(S, A)
            if gain > best_gain + 1e-12:  # ties (to rounding) keep the smaller row
                best, best_gain = i, gain
        A.append(best)
        gains.append(best_gain)
    return A, gains


def _smi_data(seed, n=30, m=6):
    rng = np.random.default_rng(seed)
    pool = badge.grad_embedding(_probs(rng, n, 3), rng.normal(size=(n, 5)), bias=True)
    qp = _probs(rng, m, 3)
    query = badge.grad_embedding(qp, rng.normal(size=(m, 5)), rng.integers(0, 3, m), bias=True)
    return pool, query


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("eta", [1.0, 0.3])
def test_flqmi_greedy_matches_brute_force_marginal_gains(seed, eta):
    pool, query = _smi_data(seed)
    S = ref_sim(pool.dense(), query.dense())
    np.testing.assert_allclose(similar.similarity(pool, query), S, atol=1e-12)
    rows, gains = similar.flqmi_greedy(pool, query, 10, eta=eta)
    want, want_gains = ref_greedy(S, 10, lambda S, A: ref_flqmi(S, A, eta))
    assert rows.tolist() == want
    np.testing.assert_allclose(gains, want_gains, atol=1e-10)
    assert (np.diff(gains) <= 1e-12).all()  # submodular: gains never grow


def test_gcmi_matches_brute_force_and_zero_vectors_have_similarity_one_half():
    pool, query = _smi_data(3)
    S = ref_sim(pool.dense(), query.dense())
    rows, gains = similar.gcmi_top(pool, query, 8)
    want, want_gains = ref_greedy(S, 8, ref_gcmi)
    assert rows.tolist() == want
    np.testing.assert_allclose(gains, want_gains, atol=1e-10)
    onehot = np.eye(3)[[0, 1]]  # a certain prediction: p − e_ŷ = 0
    zero = badge.grad_embedding(onehot, np.ones((2, 5)), bias=True)
    np.testing.assert_array_equal(similar.similarity(zero, query), 0.5)
    with pytest.raises(AlfkError, match="query set is empty"):
        similar.flqmi_greedy(pool, query.take(np.array([], dtype=np.int64)), 2)


def test_flqmi_is_the_same_whatever_the_chunk_cache_and_batch(monkeypatch):
    pool, query = _smi_data(4, n=50)
    rows, _ = similar.flqmi_greedy(pool, query, 12)
    S = ref_sim(pool.dense(), query.dense())
    assert rows.tolist() == ref_greedy(S, 12, lambda S, A: ref_flqmi(S, A, 1.0))[0]
    for name, value in (("CHUNK", 7), ("CACHE_ENTRIES", 0), ("LAZY_BATCH", 1)):
        monkeypatch.setattr(similar, name, value)
        if name == "CHUNK":
            monkeypatch.setattr(badge, "CHUNK", 7)
        assert similar.flqmi_greedy(pool, query, 12)[0].tolist() == rows.tolist(), name


# --- class-balanced entropy ----------------------------------------------------------------------


def ref_quotas(P, weights):
    total = sum(weights)
    exact = [P * w / total for w in weights]
    q = [math.floor(e) for e in exact]
    order = sorted(range(len(weights)), key=lambda d: (-(exact[d] - q[d]), d))
    for d in order[: P - sum(q)]:
        q[d] += 1
    return q


def ref_balanced(scores, predicted, quotas, available):
    chosen = []
    for d, q in enumerate(quotas):
        cands = [i for i in range(len(scores)) if available[i] and predicted[i] == d]
        chosen += sorted(cands, key=lambda i: (-scores[i], i))[:q]
    rest = [i for i in range(len(scores)) if available[i] and i not in chosen]
    chosen += sorted(rest, key=lambda i: (-scores[i], i))[: sum(quotas) - len(chosen)]
    return sorted(chosen, key=lambda i: (-scores[i], i))


def test_class_quotas_match_the_largest_remainder_loop():
    rng = np.random.default_rng(0)
    for _ in range(50):
        w = rng.integers(0, 9, rng.integers(2, 7)).astype(float)
        w[0] += 1
        P = int(rng.integers(0, 40))
        q = class_quotas(P, w)
        assert q.tolist() == ref_quotas(P, w.tolist()) and q.sum() == P
    assert class_quotas(10, np.ones(4)).tolist() == [3, 3, 2, 2]
    with pytest.raises(AlfkError):
        class_quotas(3, np.zeros(3))


def test_balanced_top_matches_a_quota_loop_with_shortfalls():
    rng = np.random.default_rng(1)
    for trial in range(30):
        n, D = 40, 4
        probs = _probs(rng, n, D)
        probs[: n // 2, 0] += 3  # class 0 predicted often, the others rarely
        probs /= probs.sum(1, keepdims=True)
        scores, predicted = baselines.entropy(probs), probs.argmax(1)
        available = rng.random(n) < 0.8
        quotas = class_quotas(int(rng.integers(1, 15)), rng.random(D) + 0.1)
        got = baselines.balanced_top(scores, predicted, quotas, available)
        assert got.tolist() == ref_balanced(scores, predicted, quotas, available), trial


# --- through ``alfk select`` on the stores -------------------------------------------------------

P = 6


@pytest.fixture
def world(tmp_path, monkeypatch):
    """val/ (3 classes × 4), a pool of 40 images, a task checkpoint for the 3 classes."""
    from pathlib import Path

    from alfk_cli.models.checkpoint import save_checkpoint
    from conftest import make_labelled, write_images

    monkeypatch.chdir(tmp_path)
    make_labelled(Path("val"), ["a", "b", "c"], 4)
    write_images(Path("pool"), 40, seed=10)
    save_checkpoint("model.pt", build_model("lenet", 3, seed=0), "lenet", ["a", "b", "c"])
    Path("sent.txt").write_text("pool/img0003.png\npool/img0017.png\n")
    return tmp_path


def _select(cli, *args: str) -> list[str]:
    r = cli("select", "--val", "val", "--pool", "pool", "--P", str(P), "--model", "model.pt",
            "--device", "cpu", "--workers", "0", "--exclude", "sent.txt", "--no-ledger",
            "--seed", "3", *args)  # fmt: skip
    assert r.exit_code == 0, r.stderr
    return r.stdout.splitlines()


def _softmax(logits):
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _read(name):
    """probs, classifier inputs (fc1: the last scale of z) and labels of a store."""
    from alfk_cli.store.reader import open_store

    with open_store(f".alfk/pool/{name}.h5") as s:
        assert s.taps[-1] == "fc1"
        feats = s.z[:, -s.scale_dims[-1] :].astype(np.float64)
        return s.paths, _softmax(s.logits[:].astype(np.float64)), feats, s.labels[:]


def _available(paths):
    return np.array([p not in {"img0003.png", "img0017.png"} for p in paths])


def test_select_badge_is_kmeanspp_over_the_stores_gradients(cli, world):
    printed = _select(cli, "--strategy", "badge")
    paths, probs, feats, _ = _read("pool")
    avail = np.flatnonzero(_available(paths))
    X = badge.grad_embedding(probs[avail], feats[avail]).dense()
    want = avail[ref_kmeanspp(X, P, 3)]
    assert printed == [f"pool/{paths[i]}" for i in want]
    assert _select(cli, "--strategy", "badge") == printed


@pytest.mark.parametrize("function", ["flqmi", "gcmi"])
def test_select_similar_queries_the_misclassified_validation_images(cli, world, function):
    printed = _select(cli, "--strategy", f"similar:{function}")
    paths, probs, feats, _ = _read("pool")
    _, vp, vf, vy = _read("val")
    wrong = vp.argmax(1) != vy
    assert wrong.any() and not wrong.all()  # an untrained model: some right, some wrong
    avail = np.flatnonzero(_available(paths))
    X = badge.grad_embedding(probs[avail], feats[avail], bias=True).dense()
    Q = badge.grad_embedding(vp[wrong], vf[wrong], vy[wrong], bias=True).dense()
    f = ref_gcmi if function == "gcmi" else (lambda S, A: ref_flqmi(S, A, 1.0))
    want, _ = ref_greedy(ref_sim(X, Q), P, f)
    assert printed == [f"pool/{paths[i]}" for i in avail[want]]
    if function == "flqmi":
        assert _select(cli, "--strategy", "similar") == printed


def test_select_balanced_entropy_fills_predicted_class_quotas(cli, world):
    printed = _select(cli, "--strategy", "balanced-entropy")
    paths, probs, _, _ = _read("pool")
    avail = _available(paths)
    scores = -(probs * np.log(probs)).sum(1)
    want = ref_balanced(scores, probs.argmax(1), [2, 2, 2], avail)  # validation: 4 per class
    assert printed == [f"pool/{paths[i]}" for i in want]
    assert _select(cli, "--strategy", "balanced-entropy:equal") == printed
    picked = probs.argmax(1)[[paths.index(p.removeprefix("pool/")) for p in printed]]
    for d in range(3):  # each class its quota, or every available image predicted as it
        assert (picked == d).sum() >= min(2, (probs.argmax(1)[avail] == d).sum())


def test_strategies_needing_the_classifier_input_refuse_stores_without_it(cli, world):
    for bad in ("badge", "similar:gcmi"):
        r = cli("select", "--val", "val", "--pool", "pool", "--P", "3", "--model", "model.pt",
                "--device", "cpu", "--workers", "0", "--no-ledger", "--taps", "L20",
                "--strategy", bad)  # fmt: skip
        assert r.exit_code == 1 and "Traceback" not in r.stderr
        assert "embed the stores with taps that include fc1" in r.stderr
    r = cli("select", "--val", "val", "--pool", "pool", "--P", "3", "--strategy", "similar:x")
    assert r.exit_code != 0 and "similar[:flqmi|gcmi]" in r.stderr
