"""describe_batch (z, g, logits) and the pseudo-label estimators against independent references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from alfk_cli.acquisition import standardize
from alfk_cli.descriptors import describe_batch
from alfk_cli.errors import AlfkError
from alfk_cli.models import ARCHS, build_model, pool, resolve_taps, scale_dims
from alfk_cli.pseudolabels import (
    MCConfig,
    NearestReference,
    cross_cov_trace,
    draw_perturbations,
    gaussian_mi,
    image_keys,
    mc_labels,
    mc_scores,
    perturb,
    rotate,
    yhat,
)
from conftest import blob_images, per_image_reference, randomise_batch_norm

PRESETS = [(arch, preset) for arch in ARCHS for preset in ARCHS[arch].presets]
D = 5


def _model(arch: str) -> torch.nn.Module:
    return randomise_batch_norm(build_model(arch, D, seed=0))


def _inputs(arch: str, n: int, seed: int = 0) -> torch.Tensor:
    spec = ARCHS[arch].input
    return torch.randn(
        n, spec.channels, spec.size, spec.size, generator=torch.Generator().manual_seed(seed)
    )


def _reference(model, x, taps, labels):
    """z, g, logits per image alone, with hooks on the taps' stages (conftest)."""
    stages = {t: model.stages[t] for t in taps}
    return per_image_reference(model, x, labels, stages, lambda _t, a: pool(a))


def _rel_err(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.linalg.norm(a - b, axis=1) / np.maximum(np.linalg.norm(b, axis=1), 1e-12)


@pytest.mark.parametrize("label_mode", ["given", "yhat", "p_yz"])
@pytest.mark.parametrize("arch,preset", PRESETS)
def test_g_equals_per_image_autograd(arch, preset, label_mode):
    taps = resolve_taps(arch, preset)
    model = _model(arch)
    n = 2 if arch == "resnet18" else 4
    x = _inputs(arch, n)
    if label_mode == "given":
        z, g, logits, used = describe_batch(model, x, taps, labels=torch.tensor([0, 3, 1, 4][:n]))
    elif label_mode == "yhat":
        z, g, logits, used = describe_batch(model, x, taps, label_fn=yhat)
        assert torch.equal(used, logits.argmax(1))
    else:
        dims = scale_dims(arch, taps)
        rng = np.random.default_rng(0)
        ref = NearestReference(rng.random((30, sum(dims))), rng.integers(0, D, 30), dims)
        z, g, logits, used = describe_batch(model, x, taps, label_fn=ref)
        assert torch.equal(used, torch.from_numpy(ref.labels[ref.search(z.numpy())[1]]))
    assert z.shape == g.shape == (n, sum(scale_dims(arch, taps)))
    assert logits.shape == (n, D) and used.dtype == torch.int64
    z_ref, g_ref, logits_ref = _reference(model, x, taps, used)
    assert _rel_err(g.numpy(), g_ref).max() <= 1e-4
    assert _rel_err(z.numpy(), z_ref).max() <= 1e-5
    np.testing.assert_allclose(logits.numpy(), logits_ref, rtol=1e-4, atol=1e-5)
    assert np.abs(g_ref).sum() > 0  # a meaningful comparison


def test_describe_batch_restores_the_model_and_leaves_no_parameter_grads():
    model = build_model("lenet", D, seed=0).train()
    flags = [p.requires_grad for p in model.parameters()]
    next(iter(model.parameters())).requires_grad_(False)
    flags[0] = False
    x = _inputs("lenet", 3)
    z1, g1, _, _ = describe_batch(
        model, x, resolve_taps("lenet", "L80"), labels=torch.tensor([0, 1, 2])
    )
    assert model.training
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    # eval mode was used: the same result as on an eval-mode model (no dropout noise)
    z2, g2, _, _ = describe_batch(
        model.eval(), x, resolve_taps("lenet", "L80"), labels=torch.tensor([0, 1, 2])
    )
    assert torch.equal(z1, z2) and torch.equal(g1, g2)


def test_describe_batch_argument_errors():
    model = build_model("lenet", D, seed=0)
    x = _inputs("lenet", 2)
    with pytest.raises(ValueError):
        describe_batch(model, x, ("fc1",))
    with pytest.raises(ValueError):
        describe_batch(model, x, ("fc1",), labels=torch.tensor([0, D]))


# --- standardisation and p_yz --------------------------------------------------------------------


def _np_standardize(v: np.ndarray, dims: list[int]) -> np.ndarray:
    out = np.zeros_like(v, dtype=np.float64)
    s = 0
    for n in dims:
        for i in range(len(v)):
            a = v[i, s : s + n].astype(np.float64)
            sd = a.std(ddof=1) if n > 1 else 0.0
            out[i, s : s + n] = (a - a.mean()) / sd if sd > 0 else 0.0
        s += n
    return out


def test_standardize_per_scale_slice():
    rng = np.random.default_rng(0)
    dims = [10, 20, 50]
    v = rng.random((7, 80)) * 5
    v[3, 10:30] = 2.5  # a constant slice becomes zeros
    got = standardize(v, dims)
    np.testing.assert_allclose(got, _np_standardize(v, dims), rtol=1e-5, atol=1e-5)
    assert (got[3, 10:30] == 0).all()
    # dot product of two standardised vectors = Σ_j (L_j − 1)·PCC_j
    a, b = got[0], got[1]
    pcc = sum(
        (n - 1) * np.corrcoef(v[0, s : s + n], v[1, s : s + n])[0, 1]
        for s, n in ((0, 10), (10, 20), (30, 50))
    )
    assert np.isclose(a @ b, pcc, rtol=1e-4)


def test_p_yz_equals_brute_force_nearest_neighbour():
    rng = np.random.default_rng(1)
    dims = [10, 20, 50]
    ref_z = rng.random((300, 80)).astype(np.float32) * rng.random((300, 1)) * 3
    ref_labels = rng.integers(0, 7, 300)
    queries = rng.random((64, 80)).astype(np.float32)
    nn = NearestReference(ref_z, ref_labels, dims)
    got = nn(torch.from_numpy(queries)).numpy()
    sims = _np_standardize(queries, dims) @ _np_standardize(ref_z, dims).T
    want = ref_labels[sims.argmax(1)]
    assert (got == want).all()
    sim, _ = nn.search(queries)
    np.testing.assert_allclose(sim, sims.max(1), rtol=1e-4)
    # blocked over the reference (small blocks) gives the same answer
    small = NearestReference(ref_z, ref_labels, dims, block_elems=64 * 37)
    assert (small(torch.from_numpy(queries)).numpy() == want).all()
    # a tie goes to the lowest reference row
    twins = NearestReference(
        np.concatenate([ref_z[:5], ref_z[:5]]), np.r_[ref_labels[:5], ref_labels[:5] + 1], dims
    )
    assert (twins.search(ref_z[:5])[1] == np.arange(5)).all()


def test_knn_neighbours_and_soft_labels_equal_brute_force():
    rng = np.random.default_rng(2)
    dims = [10, 20, 50]
    ref_z = rng.random((300, 80)).astype(np.float32)
    ref_z[150:160] = ref_z[:10]  # exact duplicates: ties go to the lower reference row
    ref_labels = rng.integers(0, 7, 300)
    queries = np.concatenate([rng.random((40, 80)), ref_z[:10]]).astype(np.float32)
    sims = _np_standardize(queries, dims) @ _np_standardize(ref_z, dims).T
    for block in (1 << 24, 50 * 13):  # one block, and blocks much smaller than the reference
        nn = NearestReference(ref_z, ref_labels, dims, block_elems=block)
        sim, rows = nn.neighbours(torch.from_numpy(queries), 10)
        for i in range(len(queries)):
            want = sorted(range(300), key=lambda j, i=i: (-round(sims[i, j], 4), j))[:10]
            assert sorted(rows[i].tolist()) == sorted(want)
            np.testing.assert_allclose(sim[i].numpy(), sims[i, rows[i].numpy()], rtol=1e-4)
            assert (np.diff(sim[i].numpy()) <= 1e-6).all()
        twins = rows[40:].numpy()
        assert all(t in r for t, r in zip(range(10), twins))  # duplicate pair: both in the list
        assert all(list(r).index(t) < list(r).index(t + 150) for t, r in zip(range(10), twins))
        soft = nn.soft(10)(torch.from_numpy(queries), torch.zeros(len(queries), 9))
        want = np.stack([np.bincount(ref_labels[r], minlength=9) / 10 for r in rows.numpy()])
        np.testing.assert_allclose(soft.numpy(), want)


@pytest.mark.parametrize("arch,preset", [("lenet", "L80"), ("resnet10", "L768")])
def test_soft_labels_give_the_expected_fisher_score(arch, preset):
    """g with soft labels w equals sum_c w_c g(c): per-image autograd at every hard label."""
    taps = resolve_taps(arch, preset)
    model = _model(arch)
    x = _inputs(arch, 3, seed=4)
    w = torch.tensor([[0.5, 0.5, 0, 0, 0], [0.1, 0.2, 0.3, 0.4, 0.0], [0, 0, 0, 0, 1.0]])
    _, g, _, used = describe_batch(model, x, taps, labels=w)
    assert used.tolist() == [0, 3, 4]  # most likely class, ties to the lower one
    expected = np.zeros_like(g.numpy())
    for c in range(D):
        _, g_c, _ = _reference(model, x, taps, torch.full((3,), c))
        expected += w[:, c : c + 1].numpy() * g_c
    assert _rel_err(g.numpy(), expected).max() <= 1e-4
    with pytest.raises(ValueError, match="soft labels"):
        describe_batch(model, x, taps, labels=torch.ones(3, D + 1) / (D + 1))


def test_p_yz_refuses_unlabelled_reference():
    with pytest.raises(AlfkError, match="labelled"):
        NearestReference(np.ones((3, 4)), np.array([0, -1, 1]), [4])


# --- Monte-Carlo ---------------------------------------------------------------------------------


def test_rotation_is_in_degrees_and_counter_clockwise():
    x = torch.rand(2, 3, 16, 16)
    np.testing.assert_allclose(
        rotate(x, torch.tensor([90.0, -90.0]))[0], torch.rot90(x[0], 1, (1, 2)), atol=1e-5
    )
    np.testing.assert_allclose(
        rotate(x, torch.tensor([90.0, -90.0]))[1], torch.rot90(x[1], -1, (1, 2)), atol=1e-5
    )
    np.testing.assert_allclose(rotate(x, torch.zeros(2)), x, atol=1e-6)
    # 5 degrees is a small rotation: most of the image is unchanged
    smooth = F.avg_pool2d(torch.rand(1, 1, 64, 64), 9, 1, 4)
    assert (rotate(smooth, torch.tensor([5.0])) - smooth)[..., 16:48, 16:48].abs().mean() < 0.05


def test_perturbations_are_bounded_seeded_and_per_image():
    cfg = MCConfig(samples=64)
    keys = image_keys(0, ["a.png", "b.png"])
    deg, noise = draw_perturbations(keys, cfg, (1, 8, 8))
    assert deg.shape == (2, 64) and noise.shape == (2, 64, 1, 8, 8)
    assert deg.abs().max() <= 5.0 and deg.abs().max() > 3.0 and deg.min() < 0 < deg.max()
    deg2, noise2 = draw_perturbations(keys[::-1], cfg, (1, 8, 8))
    assert torch.equal(deg2[0], deg[1]) and torch.equal(
        noise2[1], noise[0]
    )  # per image, not per batch
    assert not torch.equal(deg[0], deg[1])
    assert (image_keys(0, ["a.png"]) == keys[:1]).all() and (
        image_keys(1, ["a.png"]) != keys[:1]
    ).all()
    x = torch.full((1, 1, 28, 28), 0.5)
    out = perturb(x, keys[:1], MCConfig(samples=16, max_degrees=0.0))
    assert out.shape == (16, 1, 28, 28)
    assert abs(float((out - 0.5).std()) - 0.01) < 0.002  # σ = 0.01 on the [0, 1] scale


def _np_mi(z: np.ndarray, s: np.ndarray, eps: float) -> float:
    """Textbook: 0.5·log(|C_zz + λ_z I||C_ss + λ_s I| / |C_joint + diag(λ_z I, λ_s I)|)."""
    L = z.shape[1]
    j = np.cov(np.concatenate([z, s], 1), rowvar=False)  # (2L, 2L), ddof=1
    czz, css = j[:L, :L], j[L:, L:]
    lz, ls = eps * np.trace(czz) / L, eps * np.trace(css) / L
    ridge = np.diag(np.r_[np.full(L, lz), np.full(L, ls)])
    return 0.5 * (
        np.linalg.slogdet(czz + lz * np.eye(L))[1]
        + np.linalg.slogdet(css + ls * np.eye(L))[1]
        - np.linalg.slogdet(j + ridge)[1]
    )


@pytest.mark.parametrize(
    "k,L", [(8, 12), (40, 6)]
)  # K < 2L (singular without the ridge) and K > 2L
def test_covariance_maths_against_numpy(k, L):
    rng = np.random.default_rng(k)
    z = rng.normal(size=(3, k, L))
    s = 0.3 * z @ rng.normal(size=(L, L)) + rng.normal(size=(3, k, L)) * 2.0
    zt, st = torch.from_numpy(z), torch.from_numpy(s)
    for i in range(3):
        c = np.cov(np.concatenate([z[i], s[i]], 1), rowvar=False)[:L, L:]
        assert np.isclose(cross_cov_trace(zt, st, centered=True)[i].item(), np.trace(c))
        assert np.isclose(cross_cov_trace(zt, st)[i].item(), (z[i] * s[i]).sum() / (k - 1))
        for eps in (1e-3, 0.5):
            assert np.isclose(
                gaussian_mi(zt, st, eps)[i].item(), _np_mi(z[i], s[i], eps), rtol=1e-6, atol=1e-8
            )
    # independent samples carry less information than dependent ones; MI is never negative
    indep = gaussian_mi(zt, torch.from_numpy(rng.normal(size=(3, k, L))), 0.5)
    assert (indep >= -1e-9).all() and (indep < gaussian_mi(zt, zt * 2 + 0.01 * st, 0.5)).all()


@pytest.fixture(scope="module")
def trained_lenet():
    spec = ARCHS["lenet"].input
    x, y = blob_images(600, 0)
    model = build_model("lenet", 3, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.5)
    norm = lambda u: (u.float() / 255 - spec.mean[0]) / spec.std[0]  # noqa: E731
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(150):
        idx = torch.randint(0, len(x), (32,), generator=gen)
        loss = F.cross_entropy(model(norm(x[idx])), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), spec


def test_mc_labels_valid_deterministic_and_better_than_chance(trained_lenet):
    model, spec = trained_lenet
    x, y = blob_images(36, 1)
    taps = resolve_taps("lenet", "L80")
    keys = image_keys(7, [f"img{i}.png" for i in range(len(x))])
    cfg = MCConfig(samples=8)
    tr, mi = mc_scores(model, x, spec, taps, keys, cfg)
    assert tr.shape == mi.shape == (36, 3) and torch.isfinite(tr).all() and torch.isfinite(mi).all()
    tr2, mi2 = mc_scores(model, x, spec, taps, keys, cfg)
    assert torch.equal(tr, tr2) and torch.equal(mi, mi2)
    # chunking (fewer images per forward) does not change the result
    tr3, mi3 = mc_scores(model, x, spec, taps, keys, MCConfig(samples=8, pixel_budget=8 * 784 * 5))
    torch.testing.assert_close(tr, tr3, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(mi, mi3, rtol=1e-5, atol=1e-7)
    for method in ("mc_trace", "mc_mi"):
        lab = mc_labels(method, model, x, spec, taps, keys, cfg)
        assert lab.dtype == torch.int64 and lab.shape == (36,) and ((lab >= 0) & (lab < 3)).all()
        assert torch.equal(lab, mc_labels(method, model, x, spec, taps, keys, cfg))
    assert not torch.equal(
        tr,
        mc_scores(model, x, spec, taps, image_keys(8, [f"img{i}.png" for i in range(36)]), cfg)[0],
    )
    # sanity: on easy data a trained model's mc_trace labels agree with the truth far above chance
    with torch.no_grad():
        acc_model = (
            (model(((x.float() / 255) - spec.mean[0]) / spec.std[0]).argmax(1) == y).float().mean()
        )
    acc_trace = (mc_labels("mc_trace", model, x, spec, taps, keys, cfg) == y).float().mean()
    assert acc_model > 0.9 and acc_trace > 0.8


def test_descriptors_run_without_tf32_and_restore_the_flags():
    """describe_batch turns TF32 off inside (exact float32 on CUDA) and leaves the process-wide
    flags as it found them, whatever they were."""
    seen = []
    model = _model("lenet")
    next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d)).register_forward_hook(
        lambda *_: seen.append(
            (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
        )
    )
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        for flags in ((True, True), (False, True), (True, False)):
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags
            describe_batch(model, _inputs("lenet", 2), ("conv2",), labels=torch.tensor([0, 1]))
            assert seen.pop() == (False, False)
            assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == flags
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old
