"""The search backend (docs/algorithm.md §6): the one choice of where the exact search's float32
filter runs (FAISS on the CPU, FAISS on the GPU, torch matmul + topk), and that the torch filter
gives the FAISS path's results, equal to brute-force NumPy references. (tests/unit/strategies/test_acquisition.py
runs its whole reference suite on both CPU backends; tests/e2e/test_cuda.py forces torch on CUDA.)
"""

from __future__ import annotations

import faiss
import numpy as np
import pytest
import torch
from test_acquisition import (
    KERNELS,
    assert_matches_reference,
    make_store,
    ref_dot,
    ref_kcenter,
    ref_kernel,
)

from alfk_cli.errors import AlfkError
from alfk_cli.features.standardize import norm_bound, standardize
from alfk_cli.models.archs import build_model
from alfk_cli.models.checkpoint import save_checkpoint
from alfk_cli.search.exact import (
    BACKEND_ENV,
    CPU_BACKEND,
    SearchBackend,
    exact_topk_stream,
    kcenter_greedy,
    search_backend,
    topk_ip,
)
from alfk_cli.strategies.acquisition import select
from alfk_cli.strategies.kernels import Buffers, get_kernel
from alfk_cli.util.devices import ieee_matmul
from conftest import make_labelled

TORCH_CPU = SearchBackend("torch", "cpu")


@pytest.fixture
def fake_cuda(monkeypatch):
    """A machine with two CUDA devices, as resolve_device sees it; ``gpus(n)`` sets how many
    GPUs the installed FAISS reports."""
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)

    def gpus(n: int) -> None:
        monkeypatch.setattr(faiss, "get_num_gpus", lambda: n)

    return gpus


def test_the_backend_follows_the_device_and_the_installed_faiss(fake_cuda):
    fake_cuda(0)  # faiss-cpu: the GPU runs the torch filter
    assert search_backend("cuda") == SearchBackend("torch", "cuda")
    assert search_backend("cuda:1") == SearchBackend("torch", "cuda:1")
    assert search_backend("auto") == SearchBackend("torch", "cuda")
    assert search_backend("cuda", "faiss") == CPU_BACKEND  # forced: FAISS where it can run
    fake_cuda(1)  # faiss-gpu
    assert search_backend("cuda:1") == SearchBackend("faiss-gpu", "cuda:1")
    assert search_backend("cuda", "torch") == SearchBackend("torch", "cuda")
    assert search_backend("cpu") == CPU_BACKEND  # the CPU default is FAISS on the CPU
    assert search_backend("cpu", "torch") == TORCH_CPU
    assert not CPU_BACKEND.torch_gemms and TORCH_CPU.torch_gemms


def test_the_environment_forces_a_backend_and_a_bad_value_is_one_line(monkeypatch):
    monkeypatch.setenv(BACKEND_ENV, " Torch ")
    assert search_backend("cpu") == TORCH_CPU
    assert search_backend("cpu", "auto") == CPU_BACKEND  # an explicit choice wins
    monkeypatch.setenv(BACKEND_ENV, "cublas")
    with pytest.raises(
        AlfkError, match=r"^unknown search backend 'cublas' \(ALFK_SEARCH_BACKEND\)"
    ):
        search_backend("cpu")
    monkeypatch.setenv(BACKEND_ENV, "")
    assert search_backend("cpu") == CPU_BACKEND


def test_cli_reports_a_bad_backend_as_an_error_line(cli, tmp_path, monkeypatch):
    monkeypatch.setenv(BACKEND_ENV, "gpu")
    make_labelled(tmp_path / "val", ["a", "b"], 3)
    save_checkpoint(tmp_path / "m.pt", build_model("lenet", 2, seed=0), "lenet", ["a", "b"])
    r = cli("select", "--val", tmp_path / "val", "--pool", tmp_path / "val", "--P", "1",
            "--model", tmp_path / "m.pt", "--device", "cpu", "--workdir", tmp_path / "wd")  # fmt: skip
    assert r.exit_code == 1
    assert r.stderr.strip().splitlines()[-1].startswith("error: unknown search backend 'gpu'")


def _brute_topk(q: np.ndarray, x: np.ndarray, ids: np.ndarray, k: int):
    s = ref_dot(q.astype(np.float64), x.astype(np.float64))
    order = [sorted(range(len(ids)), key=lambda j, r=r: (-r[j], ids[j]))[:k] for r in s]
    return np.take_along_axis(s, np.array(order), 1), ids[np.array(order)]


@pytest.mark.parametrize("chunk", [7, 64, 1000])
def test_torch_filter_topk_equals_faiss_and_brute_force(chunk):
    rng = np.random.default_rng(chunk)
    x = rng.standard_normal((700, 24)).astype(np.float32)
    x[300:340] = x[11]  # identical rows across chunk borders: exact ties at the k-th place
    x[50:60] = 0.0
    q = rng.standard_normal((9, 24)).astype(np.float32)
    q[0] = x[11]
    keep = np.flatnonzero(rng.random(700) > 0.2)  # excluded rows: ids with gaps
    chunks = [(keep[a : a + chunk], x[keep[a : a + chunk]]) for a in range(0, keep.size, chunk)]
    got = topk_ip(q, iter(chunks), 60, backend=TORCH_CPU)
    faiss_cpu = topk_ip(q, iter(chunks), 60, backend=CPU_BACKEND)
    ref_s, ref_i = _brute_topk(q, x[keep], keep, 60)
    np.testing.assert_array_equal(got[1], ref_i)
    np.testing.assert_array_equal(got[1], faiss_cpu[1])
    np.testing.assert_array_equal(got[0], faiss_cpu[0])  # the same canonical scores, bit for bit
    np.testing.assert_allclose(got[0], ref_s, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("kernel", KERNELS)
def test_torch_backend_selects_what_faiss_and_the_reference_select(kernel):
    """k-center (35 misclassified, 10 centres), duplicated pool and validation rows, excluded
    rows, chunks of 37 rows."""
    val, pool = make_store(52, m=70, n=400, n_mis=35, val_dups=3)
    exclude = np.zeros(400, dtype=bool)
    exclude[np.random.default_rng(1).choice(400, 60, replace=False)] = True
    args = dict(exclude=exclude, seed=3, chunk_rows=37)
    on_torch = select(val, pool, 10, kernel, backend=TORCH_CPU, **args)
    on_faiss = select(val, pool, 10, kernel, backend=CPU_BACKEND, **args)
    for name in ("selected", "score", "center", "centers"):
        np.testing.assert_array_equal(getattr(on_torch, name), getattr(on_faiss, name), name)
    assert_matches_reference(val, pool, 10, kernel, exclude=exclude, seed=3, chunk_rows=37)


@pytest.fixture
def bf16_matmuls():
    """``set_float32_matmul_precision("medium")``: oneDNN float32 matmuls in bf16 where the CPU
    has bf16 instructions (AVX512-BF16/AMX), TF32 on CUDA."""
    torch.set_float32_matmul_precision("medium")
    yield
    torch.set_float32_matmul_precision("highest")


def clustered_topk(kernel: str, backend: SearchBackend) -> tuple[np.ndarray, np.ndarray]:
    """The search's top-40 ids on ``backend`` and the reference's, for 300 pool rows within
    1e-3 of each of 5 centres. bf16 (8-bit inputs) and TF32 (11) round such rows alike, so
    their order, set by score differences of ~1e-4 on scores of ~250, is lost to a filter in
    either (whose shared error, when negative, passes the bound check)."""
    rng = np.random.default_rng(0)
    dims, n = (64, 192), 3000
    vz, vg = np.abs(rng.standard_normal((5, 256))), rng.standard_normal((5, 256))
    pz, pg = np.abs(rng.standard_normal((n, 256))), rng.standard_normal((n, 256))
    for c in range(5):
        rows = slice(100 + 550 * c, 400 + 550 * c)
        pz[rows] = vz[c] + 1e-3 * rng.standard_normal((300, 256))
        pg[rows] = vg[c] + 1e-3 * rng.standard_normal((300, 256))
    vz, vg, pz, pg = (a.astype(np.float32) for a in (vz, vg, pz, pg))
    kern = get_kernel(kernel)
    chunks = [
        (np.arange(a, a + 1000), kern.payload(pz[a : a + 1000], pg[a : a + 1000], dims, Buffers(1000)))
        for a in range(0, n, 1000)
    ]  # fmt: skip
    cz, cg = standardize(vz, dims), standardize(vg, dims)
    scorer = kern.scorer(cz, cg, backend=backend, norm_sq=norm_bound(dims))
    _, ids = exact_topk_stream(scorer, iter(chunks), 5, 40)
    # the reference: float64 products of the same float32-standardised vectors
    std64 = [standardize(a, dims).astype(np.float64) for a in (vz, vg, pz, pg)]
    sims = ref_kernel(kernel, *std64)
    want = np.stack([sorted(range(n), key=lambda j, r=r: (-r[j], j))[:40] for r in sims])
    return ids, want


@pytest.mark.parametrize("kernel", KERNELS)
def test_torch_filter_is_exact_when_the_caller_lowered_matmul_precision(kernel, bf16_matmuls):
    """On a CPU with bf16 instructions this fails when the filter's GEMMs are not forced back to
    float32 (``ieee_matmul``); elsewhere "medium" changes nothing and it passes either way."""
    ids, want = clustered_topk(kernel, TORCH_CPU)
    np.testing.assert_array_equal(ids, want)
    assert torch.get_float32_matmul_precision() == "medium"  # the caller's setting is back


def test_ieee_matmul_turns_bf16_off_and_restores_the_callers_state(bf16_matmuls):
    a = torch.randn(64, 768, generator=torch.Generator().manual_seed(0))
    b = torch.randn(768, 256, generator=torch.Generator().manual_seed(1))
    exact = a.double() @ b.double()
    with ieee_matmul():
        err = float((a @ b - exact).abs().max())
        assert torch.backends.cuda.matmul.allow_tf32 is False
    assert err < 1e-3  # float32 rounding; bf16 inputs err by ~0.3 here
    assert torch.get_float32_matmul_precision() == "medium"
    if hasattr(torch.backends.mkldnn.matmul, "fp32_precision"):  # torch >= 2.9
        assert torch.backends.mkldnn.matmul.fp32_precision == "bf16"
        torch.backends.cuda.matmul.fp32_precision = "ieee"  # a mixed legacy/new state
        with ieee_matmul():
            pass
        assert torch.backends.cuda.matmul.fp32_precision == "ieee"
        assert torch.backends.mkldnn.matmul.fp32_precision == "bf16"


def test_kcenter_picks_are_decided_canonically_whatever_the_filter_rounds():
    """The filter's similarities carry noise up to ``err``: the picks are still those of the
    exact similarities, where plain greedy on the noisy ones goes astray."""
    rng = np.random.default_rng(7)
    err, astray = 1e-3, 0
    for trial in range(12):
        n = int(rng.integers(8, 40))
        a = rng.integers(-4, 5, size=(n, n)) * 0.01  # steps of 0.01: many exact ties
        sim = a + a.T + rng.integers(0, 2, size=(n, n)) * (err / 2)  # and near-ties
        sim = (sim + sim.T) / 2
        np.fill_diagonal(sim, 10.0)
        noisy = sim + rng.uniform(-err, err, size=(n, n))
        m = int(rng.integers(2, n))
        got = kcenter_greedy(
            lambda i, s=noisy: s[i], n, m, trial, canon=lambda r, c, s=sim: s[r, c], err=err
        )
        assert got.tolist() == ref_kcenter(sim, m, trial)
        astray += kcenter_greedy(lambda i, s=noisy: s[i], n, m, trial).tolist() != got.tolist()
    assert astray > 0  # the test has teeth: without canonical decisions the noise shows


@pytest.mark.parametrize("kernel", KERNELS)
def test_kcenter_centres_are_the_same_on_both_backends_and_without_the_gram_matrix(
    kernel, monkeypatch
):
    from alfk_cli.strategies import acquisition

    val, _ = make_store(54, m=90, n=10, n_mis=60, val_dups=4)
    args = (val["z"], val["g"], val["logits"], val["labels"], val["scale_dims"], 15, kernel, 4)
    held = acquisition.choose_centers(*args)[0]
    assert acquisition.choose_centers(*args, backend=TORCH_CPU)[0].tolist() == held.tolist()
    monkeypatch.setattr(acquisition, "GRAM_MAX_ROWS", 10)  # similarities row by row instead
    for backend in (CPU_BACKEND, TORCH_CPU):
        assert acquisition.choose_centers(*args, backend=backend)[0].tolist() == held.tolist()
