"""Acquisition core (docs/algorithm.md §4-6) against an independent brute-force NumPy reference.

The reference builds full similarity matrices in float64, sorts with explicit Python keys and walks
k-center and the rank-major selection with plain loops; it imports nothing from alfk_cli except the
error type. Scores are computed as elementwise products summed along the feature axis, so identical
rows give identical scores (exact ties) on any BLAS.

Every test runs twice: with the default search backend (FAISS on the CPU) and with the torch
backend forced on the CPU (``ALFK_SEARCH_BACKEND=torch``: torch matmul + topk filter, torch
GEMMs for k-center), which must give the same results.
"""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from alfk_cli.errors import AlfkError
from alfk_cli.features.standardize import standardize
from alfk_cli.search.exact import BACKEND_ENV, kcenter_greedy, topk_ip
from alfk_cli.strategies.acquisition import (
    Descriptors,
    choose_centers,
    misclassified,
    rank_major_select,
    select,
)

KERNELS = ("sum", "pcc", "product")


@pytest.fixture(autouse=True, params=["faiss", "torch"])
def backend_env(request, monkeypatch):
    monkeypatch.setenv(BACKEND_ENV, request.param)
    return request.param


# ----------------------------------------------------------------------------- reference


def ref_standardize(x, dims):
    x = np.asarray(x, dtype=np.float64)
    out = np.zeros_like(x)
    for i in range(x.shape[0]):
        off = 0
        for width in dims:
            v = x[i, off : off + width]
            if width > 1 and not np.all(v == v[0]):
                out[i, off : off + width] = (v - v.mean()) / v.std(ddof=1)
            off += width
    return out


def ref_dot(a, b):
    return (a[:, None, :] * b[None, :, :]).sum(axis=-1)


def ref_kernel(kernel, za, ga, zb, gb):
    if kernel == "sum":
        return ref_dot(za, zb) + ref_dot(ga, gb)
    if kernel == "pcc":
        return ref_dot(za, zb)
    return ref_dot(za, zb) * ref_dot(ga, gb)


def ref_kcenter(sim, n_centers, seed):
    n = sim.shape[0]
    chosen = [int(np.random.default_rng(seed).integers(n))]
    while len(chosen) < min(n_centers, n):
        best_j, best_v = None, None
        for j in range(n):
            if j in chosen:
                continue
            v = max(sim[j, c] for c in chosen)
            if best_v is None or v < best_v:
                best_j, best_v = j, v
        chosen.append(best_j)
    return chosen


def ref_quotas(P, counts):
    """Largest remainders with plain loops: floor shares, then +1 by remainder, smaller class."""
    total = sum(counts)
    exact = [P * c / total for c in counts]
    quota = [int(np.floor(e)) for e in exact]
    for d in sorted(range(len(counts)), key=lambda d: (-(exact[d] - quota[d]), d)):
        if sum(quota) == P:
            break
        quota[d] += 1
    return quota


def ref_centers(kernel, zv, gv, labels, cand, P, seed, rule):
    if P == 0:
        return []
    if len(cand) <= P:
        return cand
    if rule == "kcenter":
        sim = ref_kernel(kernel, zv[cand], gv[cand], zv[cand], gv[cand])
        return [cand[j] for j in ref_kcenter(sim, P, seed)]
    classes = sorted({int(labels[i]) for i in cand})
    quotas = ref_quotas(P, [sum(int(labels[i]) == c for i in cand) for c in classes])
    out = []
    for c, q in zip(classes, quotas):
        mine = [i for i in cand if int(labels[i]) == c]
        if rule == "sample":
            out += sorted(np.random.default_rng(seed + c).choice(mine, q, replace=False).tolist())
        else:
            out += ref_centers(kernel, zv, gv, labels, mine, q, seed + c, "kcenter")
    return out


def ref_select(val, pool, P, kernel, exclude=None, seed=0, rule="kcenter"):
    dims = val["scale_dims"]
    zv, gv = ref_standardize(val["z"], dims), ref_standardize(val["g"], dims)
    zp, gp = ref_standardize(pool["z"], dims), ref_standardize(pool["g"], dims)
    m, n = zv.shape[0], zp.shape[0]
    mis = [i for i in range(m) if int(np.argmax(val["logits"][i])) != int(val["labels"][i])]
    fallback = not mis
    cand = mis if mis else list(range(m))
    centers = ref_centers(kernel, zv, gv, val["labels"], cand, P, seed, rule)
    excluded = set() if exclude is None else {int(i) for i in np.flatnonzero(exclude)}
    avail = [j for j in range(n) if j not in excluded]
    assert len(avail) >= P
    sim = ref_kernel(kernel, zv[centers], gv[centers], zp[avail], gp[avail])
    lists = []
    for c in range(len(centers)):
        order = sorted(range(len(avail)), key=lambda t, c=c: (-sim[c, t], avail[t]))
        lists.append([(avail[t], sim[c, t]) for t in order])
    taken, sel, scores, cent = set(), [], [], []
    for r in range(len(avail)):
        for c in sorted(range(len(centers)), key=lambda c, r=r: (-lists[c][r][1], c)):
            j, s = lists[c][r]
            if j in taken:
                continue
            taken.add(j)
            sel.append(j)
            scores.append(s)
            cent.append(centers[c])
            if len(sel) == P:
                return sel, scores, cent, centers, fallback
    raise AssertionError("reference walk ran out")


# ----------------------------------------------------------------------------- data


def make_store(
    seed,
    m=40,
    n=300,
    dims=(3, 5),
    classes=4,
    n_mis=8,
    pool_dups=20,
    const_rows=4,
    val_dups=0,
):
    # Dense continuous features: sparse ReLU-like rows in tiny slices would standardise to
    # mathematically identical patterns (one non-zero entry), i.e. ties decided by rounding noise.
    rng = np.random.default_rng(seed)
    width = sum(dims)
    vz = np.abs(rng.standard_normal((m, width))).astype(np.float32)
    vg = rng.standard_normal((m, width)).astype(np.float32)
    logits = rng.standard_normal((m, classes)).astype(np.float32)
    labels = np.argmax(logits, axis=1)
    mis = rng.choice(m, size=n_mis, replace=False)
    labels[mis] = (labels[mis] + 1) % classes
    for _ in range(val_dups):  # duplicate a misclassified validation row
        a, b = rng.choice(mis, size=2, replace=False)
        vz[b], vg[b], logits[b], labels[b] = vz[a], vg[a], logits[a], labels[a]
    pz = np.abs(rng.standard_normal((n, width))).astype(np.float32)
    pg = rng.standard_normal((n, width)).astype(np.float32)
    # Make some pool rows near the validation rows so the top lists are not flat noise.
    near = rng.choice(n, size=n // 3, replace=False)
    src = rng.integers(0, m, size=near.size)
    pz[near] = vz[src] + 0.3 * rng.random((near.size, width), dtype=np.float32)
    pg[near] = vg[src] + 0.3 * rng.standard_normal((near.size, width)).astype(np.float32)
    for _ in range(pool_dups):  # exact duplicates, anywhere (often across chunk borders)
        a, b = rng.choice(n, size=2, replace=False)
        pz[b], pg[b] = pz[a], pg[a]
    for t in range(const_rows):  # constant slices: a zero z-slice, a constant g row
        r = int(rng.integers(n))
        pz[r, : dims[0]] = 0.0
        if t % 2:
            pg[r] = 0.7
    val = dict(z=vz, g=vg, logits=logits, labels=labels, scale_dims=list(dims))
    pool = dict(z=pz, g=pg, scale_dims=list(dims))
    return val, pool


def assert_matches_reference(
    val, pool, P, kernel, exclude=None, seed=0, chunk_rows=64, rule="kcenter"
):
    got = select(
        val, pool, P, kernel, exclude=exclude, seed=seed, chunk_rows=chunk_rows, center_rule=rule
    )
    sel, scores, cent, centers, fallback = ref_select(val, pool, P, kernel, exclude, seed, rule)
    np.testing.assert_array_equal(got.centers, centers)
    np.testing.assert_array_equal(got.selected, sel)
    np.testing.assert_array_equal(got.center, cent)
    scale = max(1.0, float(np.max(np.abs(scores))))
    np.testing.assert_allclose(got.score, scores, rtol=1e-5, atol=1e-6 * scale)
    assert got.fallback == fallback
    assert got.kernel == kernel
    assert got.selected.dtype == np.int64 and got.score.dtype == np.float32
    assert len(set(got.selected.tolist())) == P
    return got


# ----------------------------------------------------------------------------- select vs reference


@pytest.mark.parametrize("kernel", KERNELS)
def test_select_basic_with_ties(kernel):
    val, pool = make_store(1)
    assert_matches_reference(val, pool, 12, kernel)


@pytest.mark.parametrize("kernel", KERNELS)
def test_select_single_centre(kernel):
    val, pool = make_store(2, n_mis=1)
    got = assert_matches_reference(val, pool, 40, kernel)
    assert got.centers.size == 1 and got.k_used >= 40


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("m", [10, 30])
def test_select_fallback_without_misclassified(kernel, m):
    val, pool = make_store(3, m=m, n_mis=0)
    got = assert_matches_reference(val, pool, 15, kernel)
    assert got.fallback
    assert got.centers.size == min(m, 15)


@pytest.mark.parametrize("kernel", KERNELS)
def test_select_kcenter_path(kernel):
    val, pool = make_store(4, m=60, n_mis=35)
    got = assert_matches_reference(val, pool, 10, kernel, seed=7)
    assert got.centers.size == 10


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("P", [1, 7, 10, 34])
@pytest.mark.parametrize("rule", ["class", "sample"])
def test_select_class_centres_path(kernel, P, rule):
    """Centres split over the true classes by their error counts, then k-center (``class``)
    or a seeded uniform sample (``sample``) within each."""
    val, pool = make_store(4, m=60, n_mis=35)
    got = assert_matches_reference(val, pool, P, kernel, seed=7, rule=rule)
    mis = misclassified(val["logits"], val["labels"])
    counts = np.bincount(val["labels"][mis], minlength=4)
    want = ref_quotas(P, [c for c in counts if c])
    assert np.bincount(val["labels"][got.centers], minlength=4)[counts > 0].tolist() == want


def test_class_centres_differ_from_kcenter_and_need_a_known_rule():
    val, pool = make_store(4, m=60, n_mis=35)
    a = select(val, pool, 8, "sum", seed=7)
    b = select(val, pool, 8, "sum", seed=7, center_rule="class")
    assert a.centers.tolist() != b.centers.tolist()  # the test data makes them differ
    with pytest.raises(AlfkError, match="centre rule"):
        select(val, pool, 8, "sum", center_rule="nearest")


@pytest.mark.parametrize("kernel", KERNELS)
def test_select_duplicated_centres_tie_by_centre_row(kernel):
    val, pool = make_store(5, n_mis=6, val_dups=2)
    assert_matches_reference(val, pool, 20, kernel)


@pytest.mark.parametrize("kernel", KERNELS)
def test_select_with_exclusions(kernel):
    val, pool = make_store(6)
    rng = np.random.default_rng(60)
    mask = rng.random(300) < 0.4
    got = assert_matches_reference(val, pool, 25, kernel, exclude=mask, chunk_rows=37)
    assert not mask[got.selected].any()
    by_index = select(val, pool, 25, kernel, exclude=np.flatnonzero(mask), chunk_rows=37)
    np.testing.assert_array_equal(by_index.selected, got.selected)


@pytest.mark.parametrize("kernel", KERNELS)
def test_select_p_equals_available(kernel):
    val, pool = make_store(7, n=80, n_mis=5)
    mask = np.zeros(80, dtype=bool)
    mask[::4] = True
    got = assert_matches_reference(val, pool, 60, kernel, exclude=mask, chunk_rows=16)
    assert sorted(got.selected.tolist()) == np.flatnonzero(~mask).tolist()


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("chunk_rows", [1, 7, 300, 100000])
def test_select_independent_of_chunking(kernel, chunk_rows):
    val, pool = make_store(8, n=120, dims=(2, 4, 7))
    assert_matches_reference(val, pool, 9, kernel, chunk_rows=chunk_rows)


@pytest.mark.parametrize("kernel", KERNELS)
def test_select_many_identical_rows_forces_regrowth(kernel):
    # 60 copies of one row: every centre's top list is a block of exact ties, so the search has
    # to fetch past its extra neighbours, and the walk needs k to grow.
    val, pool = make_store(9, n=200, n_mis=3)
    pool["z"][100:160] = pool["z"][5]
    pool["g"][100:160] = pool["g"][5]
    assert_matches_reference(val, pool, 70, kernel, chunk_rows=50)


def test_select_reads_h5py_datasets(tmp_path):
    val, pool = make_store(10)
    with h5py.File(tmp_path / "pool.h5", "w") as f:
        f["z"], f["g"] = pool["z"], pool["g"]
    with h5py.File(tmp_path / "pool.h5", "r") as f:
        store = Descriptors(z=f["z"], g=f["g"], scale_dims=pool["scale_dims"])
        got = select(val, store, 12, "sum", chunk_rows=50)
    np.testing.assert_array_equal(got.selected, select(val, pool, 12, "sum").selected)


def test_select_deterministic_for_seed():
    val, pool = make_store(11, m=60, n_mis=40)
    a = select(val, pool, 10, "sum", seed=3)
    b = select(val, pool, 10, "sum", seed=3)
    np.testing.assert_array_equal(a.selected, b.selected)
    np.testing.assert_array_equal(a.centers, b.centers)
    np.testing.assert_array_equal(a.score, b.score)


def test_select_errors():
    val, pool = make_store(12, n=50)
    with pytest.raises(AlfkError, match="exceeds"):
        select(val, pool, 51, "sum")
    with pytest.raises(AlfkError, match="exceeds"):
        select(val, pool, 45, "sum", exclude=np.arange(10))
    with pytest.raises(AlfkError, match="kernel"):
        select(val, pool, 5, "cosine")
    with pytest.raises(AlfkError, match="P must"):
        select(val, pool, 0, "sum")
    with pytest.raises(AlfkError, match="outside"):
        select(val, pool, 5, "sum", exclude=[50])
    with pytest.raises(AlfkError, match="mask"):
        select(val, pool, 5, "sum", exclude=np.zeros(49, dtype=bool))
    with pytest.raises(AlfkError, match="scale_dims"):
        select(val, dict(pool, scale_dims=[4, 4]), 5, "sum")
    with pytest.raises(AlfkError, match="device"):
        select(val, pool, 5, "sum", device="tpu")
    with pytest.raises(AlfkError, match="logits and labels"):
        select(dict(val, labels=None), pool, 5, "sum")
    with pytest.raises(AlfkError, match="rows but"):
        select(dict(val, labels=val["labels"][:-1]), pool, 5, "sum")
    bad = dict(pool, z=pool["z"].copy())
    bad["z"][3, 1] = np.nan
    with pytest.raises(AlfkError, match="non-finite"):
        select(val, bad, 5, "sum")


# ----------------------------------------------------------------------------- pieces


def test_standardize_matches_per_slice_formula():
    rng = np.random.default_rng(20)
    dims = [1, 4, 9]
    x = (rng.standard_normal((30, 14)) * 3 + 5).astype(np.float32)
    x[3, 1:5] = 2.5  # constant slice
    x[4, 5:] = 0.0  # dead slice
    got = standardize(x, dims)
    assert got.dtype == np.float32 and np.isfinite(got).all()
    np.testing.assert_allclose(got, ref_standardize(x, dims), rtol=1e-5, atol=1e-5)
    assert (got[:, 0] == 0).all() and (got[3, 1:5] == 0).all() and (got[4, 5:] == 0).all()
    # Each slice: own mean 0, own std 1 (ddof=1).
    for a, b in [(1, 5), (5, 14)]:
        s = got[5:, a:b].astype(np.float64)
        np.testing.assert_allclose(s.mean(axis=1), 0, atol=1e-6)
        np.testing.assert_allclose(s.std(axis=1, ddof=1), 1, rtol=1e-5)


def test_standardize_dot_is_scaled_pcc():
    rng = np.random.default_rng(21)
    dims = [6, 11]
    a, b = rng.standard_normal((2, 17)).astype(np.float32)
    za, zb = standardize(np.stack([a, b]), dims).astype(np.float64)
    off = 0
    for width in dims:
        sl = slice(off, off + width)
        pcc = np.corrcoef(a[sl], b[sl])[0, 1]
        np.testing.assert_allclose(za[sl] @ zb[sl], (width - 1) * pcc, rtol=1e-5)
        off += width
    total = sum(
        (w - 1) * np.corrcoef(a[o : o + w], b[o : o + w])[0, 1] for w, o in [(6, 0), (11, 6)]
    )
    np.testing.assert_allclose(za @ zb, total, rtol=1e-5)


def test_standardize_identical_rows_bitwise_equal_anywhere():
    rng = np.random.default_rng(22)
    for width in (5, 7, 13, 33):
        x = rng.standard_normal((50, 2 * width)).astype(np.float32)
        x[[3, 17, 30, 49]] = x[8]
        got = standardize(x, [width, width])
        for r in (3, 17, 30, 49):
            assert np.array_equal(got[r], got[8])
        sub = standardize(x[17:], [width, width])
        assert np.array_equal(sub[0], got[8])


def test_standardize_threaded_blocks_match_single_rows():
    rng = np.random.default_rng(23)
    x = rng.standard_normal((9000, 20)).astype(np.float32)  # > 2 x 4096 rows: split over threads
    x[[4500, 8999]] = x[5]
    got = standardize(x, [8, 12])
    assert np.array_equal(got[4500], got[5]) and np.array_equal(got[8999], got[5])
    for r in (0, 4499, 4500, 8998):
        assert np.array_equal(got[r], standardize(x[r : r + 1], [8, 12])[0])


def test_standardize_errors():
    with pytest.raises(AlfkError, match="scale_dims"):
        standardize(np.zeros((2, 5), np.float32), [2, 2])
    with pytest.raises(AlfkError, match="non-finite"):
        standardize(np.array([[1.0, np.inf, 2.0]], np.float32), [3])
    with pytest.raises(AlfkError, match="non-finite"):
        topk_ip(np.ones((1, 2), np.float32), [(0, np.array([[np.nan, 1.0]], np.float32))], 1)


def test_misclassified():
    logits = np.array([[2.0, 1.0], [0.0, 3.0], [5.0, -1.0], [0.1, 0.2]])
    got = misclassified(logits, np.array([0, 0, 1, 1]))
    assert got.dtype == np.int64
    assert got.tolist() == [1, 2]


def _ref_topk(q, x, k):
    s = ref_dot(q.astype(np.float64), x.astype(np.float64))
    ids, scores = [], []
    for row in s:
        order = sorted(range(x.shape[0]), key=lambda j, row=row: (-row[j], j))[:k]
        ids.append(order)
        scores.append(row[order])
    return np.array(scores), np.array(ids)


@pytest.mark.parametrize("chunk", [1, 9, 64, 500])
@pytest.mark.parametrize("nq", [1, 25])
def test_topk_ip_matches_argsort_with_ties(chunk, nq):
    rng = np.random.default_rng(30 + nq)
    x = rng.standard_normal((200, 12)).astype(np.float32)
    x[150:190] = x[7]  # 41 identical rows: ties straddle k and chunk borders
    x[20:30] = 0.0  # zero rows tie at score 0
    q = rng.standard_normal((nq, 12)).astype(np.float32)
    q[0] = x[7]
    k = 50
    scores, ids = topk_ip(q, ((a, x[a : a + chunk]) for a in range(0, 200, chunk)), k)
    ref_s, ref_i = _ref_topk(q, x, k)
    assert ids.dtype == np.int64 and scores.dtype == np.float32
    np.testing.assert_array_equal(ids, ref_i)
    np.testing.assert_allclose(scores, ref_s, rtol=1e-5, atol=1e-5)
    # Against numpy's stable argsort of the (float64) scores: same order.
    full = ref_dot(q.astype(np.float64), x.astype(np.float64))
    np.testing.assert_array_equal(ids, np.argsort(-full, axis=1, kind="stable")[:, :k])


def test_topk_ip_clips_k_and_accepts_id_arrays():
    rng = np.random.default_rng(31)
    x = rng.standard_normal((10, 4)).astype(np.float32)
    q = rng.standard_normal((3, 4)).astype(np.float32)
    _, ids = topk_ip(q, [(0, x[:6]), (6, x[6:])], 50)
    assert ids.shape == (3, 10)
    np.testing.assert_array_equal(ids, _ref_topk(q, x, 10)[1])
    keep = np.array([0, 2, 3, 5, 8, 9])
    _, ids2 = topk_ip(q, [(keep[:3], x[keep[:3]]), (keep[3:], x[keep[3:]])], 4)
    ref = _ref_topk(q, x[keep], 4)[1]
    np.testing.assert_array_equal(ids2, keep[ref])


def test_kcenter_matches_loop_reference_with_ties():
    rng = np.random.default_rng(40)
    for trial in range(6):
        n = int(rng.integers(5, 40))
        a = rng.integers(-3, 4, size=(n, n)).astype(np.float64)  # small integers: many ties
        sim = a + a.T
        np.fill_diagonal(sim, 10.0)
        for m in (1, 3, n // 2, n):
            got = kcenter_greedy(lambda i, sim=sim: sim[i], n, m, seed=trial)
            assert got.dtype == np.int64
            assert got.tolist() == ref_kcenter(sim, m, trial)
    assert kcenter_greedy(lambda i: np.zeros(4), 4, 9, 0).size == 4
    assert kcenter_greedy(lambda i: np.zeros(0), 0, 3, 0).size == 0


@pytest.mark.parametrize("kernel", KERNELS)
def test_choose_centers_rules(kernel):
    val, _ = make_store(41, m=50, n_mis=20)
    args = (val["z"], val["g"], val["logits"], val["labels"], val["scale_dims"])
    mis = misclassified(val["logits"], val["labels"])
    centers, fb = choose_centers(*args, 20, kernel, 0)
    assert not fb and centers.tolist() == mis.tolist()
    centers, fb = choose_centers(*args, 6, kernel, 5)
    assert not fb and centers.size == 6 and set(centers.tolist()) <= set(mis.tolist())
    labels = np.argmax(val["logits"], axis=1)
    centers, fb = choose_centers(*args[:3], labels, args[4], 60, kernel, 0)
    assert fb and centers.tolist() == list(range(50))
    with pytest.raises(AlfkError, match="unlabelled"):
        choose_centers(*args[:3], np.full(50, -1), args[4], 5, kernel, 0)


def test_rank_major_select_walk():
    ids = np.array([[5, 7, 9, 1], [5, 8, 7, 2], [6, 5, 3, 4]])
    scores = np.array([[9.0, 5.0, 3.0, 1.0], [9.0, 6.0, 4.0, 2.0], [8.0, 7.0, 2.0, 0.0]])
    sel, sc, cr = rank_major_select(ids, scores, 6)
    # rank 0: (9,c0,5) (9,c1,5 taken) (8,c2,6); rank 1: (7,c2,5 taken) (6,c1,8) (5,c0,7);
    # rank 2: (4,c1,7 taken) (3,c0,9) ...
    assert sel.tolist() == [5, 6, 8, 7, 9, 3]
    assert cr.tolist() == [0, 2, 1, 0, 0, 2]
    assert sc.dtype == np.float32 and sc.tolist() == [9.0, 8.0, 6.0, 5.0, 3.0, 2.0]
    sel, _, _ = rank_major_select(ids, scores, 100)
    assert sorted(sel.tolist()) == [1, 2, 3, 4, 5, 6, 7, 8, 9]
    padded, _, _ = rank_major_select(np.array([[3, -1]]), np.array([[1.0, -np.inf]]), 5)
    assert padded.tolist() == [3]
