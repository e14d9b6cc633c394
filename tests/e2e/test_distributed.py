"""torchrun: two gloo processes on the CPU give the stores, scores file and selection of one
process, exactly; a rank that fails stops both with one error line and leaves a partial that the
next run resumes; training runs under DDP. Plus the pieces (per-rank top-k merge, row shares)
against brute force."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from test_decode_failures import bad_idat_png

from alfk_cli.embed.shard import rank_rows
from alfk_cli.search.exact import IPScorer, exact_topk_stream
from alfk_cli.search.sharded import merge_topk, rank_range
from conftest import make_labelled, write_images

BATCH = "4"  # 31 pool rows: 8 batches, 4 per rank


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", ALFK_PROGRESS="plain", ALFK_DIST_TIMEOUT="120", **extra)
    return env


def alfk(cwd: Path, *args: str, nproc: int = 1, **env: str) -> subprocess.CompletedProcess:
    """``alfk ARGS`` in ``cwd``: one process, or ``nproc`` under torchrun (gloo, CPU); ``env``
    adds environment variables."""
    launch = [sys.executable, "-m", "alfk_cli"]
    if nproc > 1:
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        launch += [f"--nproc_per_node={nproc}", "-m", "alfk_cli"]
    return subprocess.run(
        [*launch, *args], cwd=cwd, env=_env(**env), capture_output=True, text=True, timeout=240
    )


def contents(path: Path) -> tuple[dict[str, np.ndarray], dict[str, object]]:
    """Every dataset (recursively) and every root attribute of an HDF5 file."""
    data: dict[str, np.ndarray] = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: data.setdefault(name, obj[()]) if obj.shape != () else None)
        attrs = {k: f.attrs[k] for k in f.attrs}
    return data, attrs


def assert_same_file(a: Path, b: Path) -> None:
    data_a, attrs_a = contents(a)
    data_b, attrs_b = contents(b)
    assert sorted(data_a) == sorted(data_b)
    for name in data_a:
        assert data_a[name].dtype == data_b[name].dtype, name
        np.testing.assert_array_equal(data_a[name], data_b[name], err_msg=name)
    assert sorted(attrs_a) == sorted(attrs_b)
    for key in attrs_a:
        np.testing.assert_array_equal(attrs_a[key], attrs_b[key], err_msg=key)


def error_lines(stderr: str) -> list[str]:
    return re.findall(r"^error: .*$", stderr, flags=re.M)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """val/ (3 classes × 4), pool/ (30 images and one that fails to decode, in rank 1's share),
    init.pt; the runs happen in one/ (a single process) and two/ (torchrun), beside them."""
    from alfk_cli.models.archs import ROTATION_CLASSES, build_model
    from alfk_cli.models.checkpoint import save_checkpoint

    root = tmp_path_factory.mktemp("dist")
    make_labelled(root / "val", ["a", "b", "c"], 4)
    write_images(root / "pool", 30, seed=10)
    bad_idat_png(root / "pool" / "img0026b.png")  # row 27: rank 1's third batch
    model = build_model("lenet", len(ROTATION_CLASSES), seed=0)
    save_checkpoint(root / "init.pt", model, "lenet", list(ROTATION_CLASSES), head="rotation")
    for sub in ("one", "two"):
        (root / sub).mkdir()
    return root


EMBED = ("embed", "--model", "../init.pt", "--device", "cpu", "--batch-size", BATCH)


@pytest.fixture
def one_thread():
    """Torch on one thread, as the torchrun ranks (OMP_NUM_THREADS=1): the same floating-point
    reductions, so the same bits."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_torchrun_embed_and_score_equal_one_process(world: Path, cli, monkeypatch, one_thread):
    one, two = world / "one", world / "two"
    val = (*EMBED, "--images", "../val", "--out", "val.h5")
    pool = (*EMBED, "--images", "../pool", "--reference", "val.h5", "--out", "pool.h5")
    score = ("score", "--val", "val.h5", "--pool", "pool.h5", "--P", "9", "--out", "s.h5")
    monkeypatch.chdir(one)  # the single-process reference, in this process
    for args in (val, pool, score):
        assert cli(*args).exit_code == 0

    assert alfk(two, *val, nproc=2).returncode == 0
    # rank 1 meets the bad image under --strict: both ranks stop, one error line, no store
    failed = alfk(two, *pool, "--strict", nproc=2)
    assert failed.returncode != 0
    assert len(error_lines(failed.stderr)) == 1, failed.stderr
    assert "img0026b.png" in error_lines(failed.stderr)[0]
    assert not (two / "pool.h5").exists()
    assert (two / ".pool.h5.partial").exists()
    # the re-run resumes the rows both ranks finished (shard included) and lists the bad image
    resumed = alfk(two, *pool, nproc=2)
    assert resumed.returncode == 0, resumed.stderr
    summary = re.search(
        r"pool\.h5: 30 images \((\d+) computed, 0 reused, (\d+) resumed\)", resumed.stderr
    )
    assert summary is not None, resumed.stderr
    # how far rank 0 got before torchrun stopped it depends on the machine's load: some rows
    # were resumed, and together with the computed ones they are every good image, once
    assert int(summary[2]) >= 1 and int(summary[1]) + int(summary[2]) == 31 - 1
    assert "img0026b.png" in resumed.stderr
    assert sorted(p.name for p in two.iterdir()) == ["pool.h5", "val.h5"]  # no partial, no shard

    assert alfk(two, *score, nproc=2).returncode == 0
    for name in ("val.h5", "pool.h5", "s.h5"):
        assert_same_file(one / name, two / name)
    monkeypatch.chdir(two)  # the store torchrun wrote is up to date for a single process too
    again = cli(*pool)
    assert again.exit_code == 0 and "pool.h5 is up to date" in again.stderr, again.stderr
    assert "img0026b.png" in again.stderr  # its decode failure listed again, from the store
    printed = [cli("select", "--scores", f"{d}/s.h5", "--format", "csv").stdout for d in (one, two)]
    assert printed[0] == printed[1] and printed[0].count("\n") == 10


def test_torchrun_score_on_the_torch_backend_equals_faiss_in_one_process(
    world: Path, cli, monkeypatch, one_thread
):
    """ALFK_SEARCH_BACKEND=torch: each rank filters its share of the pool with torch matmul +
    topk (and k-center with torch GEMMs); the merged scores file is the single-process FAISS
    one, for the inner-product and the product kernels."""
    one = world / "one"
    monkeypatch.chdir(one)
    for args in (
        (*EMBED, "--images", "../val", "--out", "val.h5"),
        (*EMBED, "--images", "../pool", "--reference", "val.h5", "--out", "pool.h5"),
    ):
        assert cli(*args).exit_code == 0  # up to date when the test above made them
    for kernel in ("sum", "product"):
        score = ("score", "--val", "val.h5", "--pool", "pool.h5", "--P", "4", "--kernel", kernel)
        assert cli(*score, "--out", f"faiss-{kernel}.h5").exit_code == 0
        run = alfk(one, *score, "--out", f"torch-{kernel}.h5", nproc=2, ALFK_SEARCH_BACKEND="torch")
        assert run.returncode == 0, run.stderr
        assert_same_file(one / f"faiss-{kernel}.h5", one / f"torch-{kernel}.h5")
        with h5py.File(one / f"torch-{kernel}.h5", "r") as f:
            assert f.attrs["misclassified"] > 4 == f["centers"].shape[0]  # k-center chose them


def test_torchrun_train_uses_ddp_and_writes_a_checkpoint(world: Path, cli, monkeypatch):
    two = world / "two"
    args = ("train", "--data", "../val", "--val", "../val", "--init", "../init.pt")
    run = alfk(two, *args, "--out", "t.pt", "--epochs", "1", "--device", "cpu", nproc=2)
    assert run.returncode == 0, run.stderr
    assert run.stderr.count("wrote t.pt") == 1  # rank 0 alone reports
    monkeypatch.chdir(two)
    used = cli(*EMBED[:2], "t.pt", "--device", "cpu", "--images", "../val", "--out", "t.h5")
    assert used.exit_code == 0, used.stderr
    with h5py.File(two / "t.h5", "r") as f:
        assert f["logits"].shape == (12, 3)


def test_torchrun_nightly_select_equals_one_process(world: Path, cli, monkeypatch, one_thread):
    """The orchestrator: rank 0 holds the lock, records the ledger and prints; the selection is
    the single-process one."""
    args = ("select", "--val", "../val", "--pool", "../pool", "--P", "6", "--model", "../init.pt")
    args += ("--device", "cpu", "--workdir", "wd")
    run = alfk(world / "two", *args, nproc=2)
    assert run.returncode == 0, run.stderr
    assert run.stderr.count("recorded as run 1") == 1
    monkeypatch.chdir(world / "one")
    single = cli(*args)
    assert single.exit_code == 0, single.stderr
    assert run.stdout == single.stdout and run.stdout.count("\n") == 6
    history = cli("history", "--workdir", str(world / "two" / "wd"))
    assert history.stdout.count("\n") == 2, history.stdout  # the header and one run


# ----------------------------------------------------------------------------- the pieces


def brute_topk(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top k per row by score descending, then id ascending, by a full sort."""
    out_s, out_i = [], []
    for s, i in zip(scores, ids):
        order = sorted(range(len(s)), key=lambda j: (-s[j], i[j]))[:k]
        out_s.append(s[order])
        out_i.append(i[order])
    return np.array(out_s), np.array(out_i)


@pytest.mark.parametrize("world_size", [2, 3, 5])
def test_merged_rank_topk_is_the_global_topk(world_size: int) -> None:
    rng = np.random.default_rng(world_size)
    n, d, nq, k = 57, 6, 4, 9
    x = rng.integers(-2, 3, (n, d)).astype(np.float32)  # small integers: many exact ties
    x[10] = x[40]  # identical rows in different ranks' ranges
    q = rng.integers(-2, 3, (nq, d)).astype(np.float32)
    parts = []
    for r in range(world_size):
        lo, hi = rank_range(n, r, world_size)
        ids = np.arange(lo, hi, dtype=np.int64)
        chunks = [(ids[a : a + 5], x[lo:hi][a : a + 5]) for a in range(0, hi - lo, 5)]
        parts.append(exact_topk_stream(IPScorer(q), chunks, nq, k))
    merged = merge_topk(parts, k)
    full = (q.astype(np.float64) @ x.astype(np.float64).T, np.tile(np.arange(n), (nq, 1)))
    want = brute_topk(*full, k)
    np.testing.assert_array_equal(merged[1], want[1])
    np.testing.assert_array_equal(merged[0], want[0])


def test_rank_shares_are_whole_batches_covering_the_work() -> None:
    work = np.array([0, 1, 2, 5, 6, 7, 8, 9, 12, 13, 14, 20, 21, 22])
    for world_size in (1, 2, 3, 4, 7):
        shares = [rank_rows(work, 3, r, world_size) for r in range(world_size)]
        np.testing.assert_array_equal(np.concatenate(shares), work)
        starts = np.cumsum([0] + [len(s) for s in shares])[:-1]
        assert all(s % 3 == 0 for s in starts)  # each share starts on a batch boundary


@pytest.mark.parametrize(("n", "world_size"), [(10, 2), (10, 3), (2, 4), (7, 7)])
def test_ddp_sample_shares_are_equal_and_cover_every_sample(monkeypatch, n, world_size):
    import torch

    from alfk_cli.util import distributed

    order = torch.randperm(n, generator=torch.Generator().manual_seed(n))
    monkeypatch.setattr(distributed, "world", lambda: world_size)
    shares = []
    for r in range(world_size):
        monkeypatch.setattr(distributed, "rank", lambda r=r: r)
        shares.append(distributed.shard_order(order))
    assert len({len(s) for s in shares}) == 1  # every rank takes the same number of steps
    assert set(torch.cat(shares).tolist()) == set(range(n))
    assert len(shares[0]) == -(-n // world_size)
