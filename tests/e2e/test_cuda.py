"""The CUDA paths: GPU descriptors, bf16-autocast training, GPU embedding, FAISS on the GPU,
the torch search backend on the GPU.

Skipped without a CUDA device (CI has none). On a machine with one, ``pytest tests/e2e/test_cuda.py``.
Each test compares a GPU result with the CPU result of the same computation; the CPU path is the
one checked against independent references (autograd, brute-force NumPy) in the other modules.
"""

from __future__ import annotations

from pathlib import Path

import faiss
import h5py
import numpy as np
import pytest
import torch
from test_acquisition import make_store
from test_search_backend import clustered_topk

from alfk_cli.embed.job import embed_folder
from alfk_cli.features.descriptors import describe_batch
from alfk_cli.features.montecarlo import MCConfig
from alfk_cli.features.pseudolabels import image_keys, mc_scores
from alfk_cli.models.archs import ARCHITECTURES, ROTATION_CLASSES, build_model, resolve_taps
from alfk_cli.models.checkpoint import load_checkpoint, save_checkpoint
from alfk_cli.search.exact import CPU_BACKEND, SearchBackend, search_backend, topk_ip
from alfk_cli.simulate import run as sim
from alfk_cli.strategies.acquisition import select
from alfk_cli.train.loops import TrainConfig, evaluate, fit
from alfk_cli.train.sources import ImageSource
from conftest import blob_images, make_labelled, write_images

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")
CPU = torch.device("cpu")
PRESETS = [(arch, preset) for arch in ARCHITECTURES for preset in ARCHITECTURES[arch].presets]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest per-row relative error ||a - b|| / ||b||."""
    a, b = a.double().cpu(), b.double().cpu()
    return float(((a - b).norm(dim=1) / b.norm(dim=1).clamp_min(1e-12)).max())


@pytest.mark.parametrize("arch,preset", PRESETS)
def test_describe_batch_on_the_gpu_matches_the_cpu(arch, preset):
    spec = ARCHITECTURES[arch].input
    model = build_model(arch, 5, seed=0).eval()
    x = torch.randn(
        6, spec.channels, spec.size, spec.size, generator=torch.Generator().manual_seed(0)
    )
    taps = resolve_taps(arch, preset)
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    z, g, logits, _ = describe_batch(model, x, taps, labels=labels)
    zc, gc, lc, used = describe_batch(model.to(CUDA), x.to(CUDA), taps, labels=labels)
    assert zc.device.type == gc.device.type == used.device.type == "cuda"
    assert zc.dtype == gc.dtype == torch.float32
    # plain float32 on both (descriptors turn cuDNN's TF32 off): agreement to float32 rounding
    assert _rel(zc, z) < 1e-4 and _rel(gc, g) < 1e-4 and _rel(lc, logits) < 1e-4
    assert torch.backends.cudnn.allow_tf32  # the global default is back after the call


def test_mc_scores_do_not_depend_on_the_device():
    """The perturbations are drawn on the CPU, so a Monte-Carlo pseudo-label is the same wherever
    the image is embedded."""
    spec = ARCHITECTURES["lenet"].input
    model = build_model("lenet", 3, seed=0).eval()
    x, _ = blob_images(8, 1)
    taps = resolve_taps("lenet", "L80")
    keys = image_keys(3, [f"i{i}.png" for i in range(len(x))])
    cfg = MCConfig(samples=4)
    tr, mi = mc_scores(model, x, spec, taps, keys, cfg)
    trc, mic = mc_scores(model.to(CUDA), x.to(CUDA), spec, taps, keys, cfg)
    assert _rel(trc, tr) < 1e-3 and _rel(mic, mi) < 1e-3


def test_bf16_autocast_training_learns_and_keeps_float32_weights():
    spec = ARCHITECTURES["lenet"].input
    x, y = blob_images(600, 0)
    xv, yv = blob_images(150, 1)
    train, held = ImageSource.from_tensors(x, y, spec), ImageSource.from_tensors(xv, yv, spec)
    model = build_model("lenet", 3, seed=0)
    cfg = TrainConfig(epochs=4, batch_size=32, lr=0.05, workers=0)
    result = fit(model, train, held, cfg, device=CUDA)
    assert result.best_accuracy > 0.9
    assert all(p.dtype == torch.float32 and p.is_cuda for p in model.parameters())
    # the same weights on the CPU (float32 throughout) classify the held-out set as well
    acc_cpu, _ = evaluate(model.to(CPU), held, CPU)
    assert abs(acc_cpu - result.best_accuracy) <= 0.02


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cuda")
    make_labelled(root / "val", ["a", "b", "c"], 6)
    write_images(root / "pool", 48, seed=5)
    save_checkpoint(root / "m.pt", build_model("lenet", 3, seed=0), "lenet", ["a", "b", "c"])
    return root


@pytest.mark.parametrize("method", ["p_yz", "yhat", "mc_trace"])
def test_embed_on_the_gpu_matches_the_cpu(folders, tmp_path, method):
    common = dict(batch_size=16, workers=0, mc=MCConfig(samples=4))
    for dev in ("cpu", "cuda"):
        embed_folder(
            folders / "m.pt", folders / "val", tmp_path / f"val-{dev}.h5", device=dev, **common
        )
        embed_folder(
            folders / "m.pt",
            folders / "pool",
            tmp_path / f"pool-{dev}.h5",
            reference=tmp_path / f"val-{dev}.h5",
            pseudo_label=method,
            device=dev,
            **common,
        )
    with h5py.File(tmp_path / "pool-cpu.h5") as a, h5py.File(tmp_path / "pool-cuda.h5") as b:
        assert list(a["paths"][()]) == list(b["paths"][()])
        for key in ("z", "g", "logits"):
            assert _rel(torch.from_numpy(b[key][()]), torch.from_numpy(a[key][()])) < 1e-4, key
        np.testing.assert_array_equal(a["pseudo"][()], b["pseudo"][()])


@pytest.mark.skipif(faiss.get_num_gpus() == 0, reason="the installed FAISS has no GPU support")
def test_faiss_gpu_top_k_equals_the_cpu():
    rng = np.random.default_rng(0)
    q = rng.standard_normal((7, 32)).astype(np.float32)
    x = rng.standard_normal((5000, 32)).astype(np.float32)
    x[100] = x[200]  # an exact tie: the smaller id first on both
    chunks = [(0, x[:2000]), (2000, x[2000:])]
    assert search_backend("cuda").kind == "faiss-gpu"
    s_cpu, i_cpu = topk_ip(q, iter(chunks), 50, "cpu")
    s_gpu, i_gpu = topk_ip(q, iter(chunks), 50, "cuda")
    np.testing.assert_array_equal(i_gpu, i_cpu)
    np.testing.assert_array_equal(s_gpu, s_cpu)


TORCH_CUDA = SearchBackend("torch", "cuda")


@pytest.fixture
def tf32_allowed():
    """The caller allows TF32 matmuls (``set_float32_matmul_precision("high")``)."""
    torch.set_float32_matmul_precision("high")
    yield
    torch.set_float32_matmul_precision("highest")


def test_torch_backend_is_chosen_for_cuda_with_a_cpu_only_faiss(monkeypatch):
    monkeypatch.delenv("ALFK_SEARCH_BACKEND", raising=False)
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 0)
    assert search_backend("cuda") == TORCH_CUDA


def test_torch_backend_top_k_on_the_gpu_equals_faiss_on_the_cpu(tf32_allowed):
    rng = np.random.default_rng(1)
    q = rng.standard_normal((7, 48)).astype(np.float32)
    x = rng.standard_normal((6000, 48)).astype(np.float32)
    x[100] = x[2500] = x[4999]  # exact ties across chunks: the smaller id first on both
    keep = np.flatnonzero(rng.random(6000) > 0.1)  # excluded rows
    chunks = [(keep[a : a + 2000], x[keep[a : a + 2000]]) for a in range(0, keep.size, 2000)]
    s_gpu, i_gpu = topk_ip(q, iter(chunks), 3000, backend=TORCH_CUDA)  # k > FAISS's GPU limit
    s_cpu, i_cpu = topk_ip(q, iter(chunks), 3000, backend=CPU_BACKEND)
    np.testing.assert_array_equal(i_gpu, i_cpu)
    np.testing.assert_array_equal(s_gpu, s_cpu)


@pytest.mark.parametrize("kernel", ["sum", "pcc", "product"])
def test_torch_backend_on_the_gpu_selects_what_the_cpu_selects(kernel, tf32_allowed):
    """Select forced onto the torch backend on CUDA (k-center GEMMs too), TF32 allowed by the
    caller: the CPU FAISS path's selection, scores and centres, bit for bit; and the exact top-k
    of near-identical rows that TF32 would misorder."""
    val, pool = make_store(61, m=80, n=6000, dims=(40, 88), n_mis=40, val_dups=3)
    exclude = np.zeros(6000, dtype=bool)
    exclude[::7] = True
    args = dict(exclude=exclude, seed=2, chunk_rows=1500)
    on_gpu = select(val, pool, 25, kernel, backend=TORCH_CUDA, **args)
    on_cpu = select(val, pool, 25, kernel, backend=CPU_BACKEND, **args)
    for name in ("selected", "score", "center", "centers"):
        np.testing.assert_array_equal(getattr(on_gpu, name), getattr(on_cpu, name), name)
    ids, want = clustered_topk(kernel, TORCH_CUDA)
    np.testing.assert_array_equal(ids, want)
    assert torch.get_float32_matmul_precision() == "high"  # the caller's setting is back


def test_cli_train_then_select_on_the_gpu(cli, folders, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_labelled(Path("train"), ["a", "b", "c"], 8)
    r = cli("train", "--data", "train", "--val", folders / "val", "--out", "m.pt", "--epochs", "2",
            "--device", "cuda")  # fmt: skip
    assert r.exit_code == 0, r.stderr
    assert load_checkpoint("m.pt").classes == ["a", "b", "c"]  # loads where there is no GPU
    save_checkpoint(
        "rot.pt", build_model("lenet", 4, seed=0), "lenet", list(ROTATION_CLASSES), head="rotation"
    )
    r = cli("select", "--val", folders / "val", "--pool", folders / "pool", "--P", "6",
            "--model", "rot.pt", "--device", "cuda")  # fmt: skip
    assert r.exit_code == 0, r.stderr
    lines = r.stdout.split()
    assert len(lines) == 6 == len(set(lines)) and all(Path(p).is_file() for p in lines)


def test_simulate_on_the_gpu(tmp_path):
    root = tmp_path / "data"
    classes = ["0", "1", "2", "3"]
    pool = make_labelled(root / "pool", classes, 20, prefix="p")
    val = make_labelled(root / "val", classes, 4, prefix="v")
    test = make_labelled(root / "test", classes, 4, prefix="t")
    options = sim.SimulateOptions(
        pool=pool, val=val, test=test, out=tmp_path / "res",
        strategies=("random", "fk:p_yz", "varR"), rounds=2, P=4, seeds=(0,), init="pretrain",
        pretrain_epochs=1, epochs=2, imbalance=2, rare=("2", "3"), mc_samples=3, device="cuda",
        workers=0,
    )  # fmt: skip
    rows = sim.simulate(options)
    assert [(r["strategy"], r["round"]) for r in rows] == [
        (s, k) for s in ("random", "fk:p_yz", "varR") for k in (1, 2)
    ]
    assert all(r["labels"] == 4 * r["round"] for r in rows)
