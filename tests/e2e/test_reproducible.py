"""Issue 9: the same inputs, options and seed give byte-identical outputs on the CPU.

Each command runs twice, in two fresh folders holding copies of the same inputs (``copytree``
keeps the files' mtimes, which feature stores record), and the outputs are compared byte for
byte. The in-process runner shares one torch RNG between the runs, so a result that leaked or
depended on earlier RNG use would differ too. Runs use --workers 0 once and 2 once.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import time
from pathlib import Path

import pytest
import torch

from alfk_cli.errors import AlfkError
from alfk_cli.util.reproducible import created_stamp, seeded
from conftest import make_labelled, write_images

CLASSES = ["a", "b", "c"]
CPU = ("--device", "cpu", "--quiet")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """val/ (3 × 4), lab/ (3 × 6), a flat pool/ of 30 and test/ (3 × 4), written once."""
    root = tmp_path_factory.mktemp("inputs")
    make_labelled(root / "val", CLASSES, 4, prefix="v")
    make_labelled(root / "lab", CLASSES, 6, prefix="l")
    make_labelled(root / "test", CLASSES, 4, prefix="t")
    write_images(root / "pool", 30, seed=10)
    return root


def fresh(inputs: Path, folder: Path, monkeypatch) -> Path:
    """A copy of the inputs (same mtimes) in ``folder``, made the working directory."""
    shutil.copytree(inputs, folder)
    monkeypatch.chdir(folder)
    return folder


def use_rng() -> None:
    """What a library caller might do before calling alfk: draw from torch's global RNG."""
    torch.rand(7)


def ok(r):
    assert r.exit_code == 0, r.stderr
    return r


def bytes_of(folder: Path, *names: str) -> dict[str, bytes]:
    return {n: (folder / n).read_bytes() for n in names}


def next_second() -> None:
    """Sleep into the next wall-clock second, so a timestamp in a file would differ."""
    time.sleep(1.05 - time.time() % 1)


def test_two_cold_selects_in_fresh_work_folders_print_identical_bytes(
    cli, inputs, tmp_path, monkeypatch
):
    args = ("select", "--val", "val", "--pool", "pool", "--P", "8", "--seed", "0", *CPU)
    runs = []
    for name, workers in (("one", "0"), ("two", "2")):
        folder = fresh(inputs, tmp_path / name, monkeypatch)
        use_rng()
        runs.append((ok(cli(*args, "--workers", workers)).stdout, folder))
        next_second()
    (out1, a), (out2, b) = runs
    assert len(out1.splitlines()) == 8
    assert out1 == out2
    work = Path(".alfk") / "pool"
    # the checkpoint and the validation store hold no absolute paths: equal bytes
    assert bytes_of(a / work, "init.pt", "val.h5") == bytes_of(b / work, "init.pt", "val.h5")


def test_a_cold_select_rewrites_its_work_folder_byte_for_byte(cli, inputs, tmp_path, monkeypatch):
    fresh(inputs, tmp_path / "w", monkeypatch)
    args = ("select", "--val", "val", "--pool", "pool", "--P", "6", "--format", "csv", *CPU)
    first = ok(cli(*args, "--workers", "2")).stdout
    Path(".alfk").rename("first")
    next_second()
    use_rng()
    second = ok(cli(*args, "--workers", "0")).stdout
    assert first == second
    names = ("init.pt", "val.h5", "pool.h5", "scores.h5")
    assert bytes_of(Path("first/pool"), *names) == bytes_of(Path(".alfk/pool"), *names)


def test_a_different_seed_changes_the_selection(cli, inputs, tmp_path, monkeypatch):
    fresh(inputs, tmp_path / "s", monkeypatch)
    args = ("select", "--val", "val", "--pool", "pool", "--P", "8", "--workers", "0", *CPU)
    seed0 = ok(cli(*args, "--seed", "0", "--workdir", "w0"))
    seed1 = ok(cli(*args, "--seed", "1", "--workdir", "w1"))
    assert Path("w0/init.pt").read_bytes() != Path("w1/init.pt").read_bytes()
    assert seed0.stdout != seed1.stdout


def _stages(cli, workers: str) -> None:
    """pretrain, train, embed (validation and pool), score and select --scores, as in the README."""
    w = ("--workers", workers)
    ok(cli("pretrain", "--images", "pool", "--out", "init.pt", "--epochs", "2", *w, *CPU))
    ok(cli("train", "--data", "lab", "--val", "val", "--init", "init.pt", "--epochs", "1",
           "--out", "model.pt", *w, *CPU))  # fmt: skip
    ok(cli("embed", "--model", "model.pt", "--images", "val", "--out", "val.h5", *w, *CPU))
    ok(cli("embed", "--model", "model.pt", "--images", "pool", "--reference", "val.h5",
           "--out", "pool.h5", *w, *CPU))  # fmt: skip
    ok(cli("embed", "--model", "model.pt", "--images", "pool", "--pseudo-label", "mc_trace",
           "--mc-samples", "2", "--out", "mc.h5", *w, *CPU))  # fmt: skip
    ok(cli("score", "--val", "val.h5", "--pool", "pool.h5", "--P", "6", "--out", "scores.h5", *CPU))
    Path("sel.txt").write_text(ok(cli("select", "--scores", "scores.h5")).stdout)


def test_every_stage_writes_the_same_bytes_twice(cli, inputs, tmp_path, monkeypatch):
    a = fresh(inputs, tmp_path / "a", monkeypatch)
    before = torch.get_rng_state()
    _stages(cli, "0")
    assert torch.equal(torch.get_rng_state(), before)  # no stage leaks RNG use to its caller
    next_second()
    b = fresh(inputs, tmp_path / "b", monkeypatch)
    use_rng()
    _stages(cli, "2")
    names = ("init.pt", "model.pt", "val.h5", "pool.h5", "mc.h5", "scores.h5", "sel.txt")
    first, second = bytes_of(a, *names), bytes_of(b, *names)
    assert [n for n in names if first[n] != second[n]] == []
    assert len(first["sel.txt"].splitlines()) == 6


def test_checkpoint_bytes_do_not_depend_on_the_file_name(cli, inputs, tmp_path, monkeypatch):
    fresh(inputs, tmp_path / "n", monkeypatch)
    for out in ("one.pt", "other-name.pt"):
        ok(cli("pretrain", "--images", "pool", "--out", out, "--epochs", "1", "--workers", "0",
               *CPU))  # fmt: skip
    assert Path("one.pt").read_bytes() == Path("other-name.pt").read_bytes()


def _simulate(cli, workers: str, *extra: str) -> None:
    ok(cli("simulate", "--pool", "lab", "--val", "val", "--test", "test", "--out", "res",
           "--strategies", "random,bald", "--rounds", "2", "--P", "3", "--epochs", "1",
           "--pretrain-epochs", "1", "--mc-samples", "2", "--rare", "c", "--workers", workers,
           "--no-plot", *extra, *CPU))  # fmt: skip


def _results_without_timing(folder: Path) -> list[dict]:
    rows = list(csv.DictReader(io.StringIO((folder / "res/results.csv").read_text())))
    return [{k: v for k, v in r.items() if not k.endswith("_seconds")} for r in rows]


def test_simulate_writes_the_same_models_and_results_twice(cli, inputs, tmp_path, monkeypatch):
    a = fresh(inputs, tmp_path / "a", monkeypatch)
    _simulate(cli, "0")
    b = fresh(inputs, tmp_path / "b", monkeypatch)
    use_rng()
    before = torch.get_rng_state()
    _simulate(cli, "2", "--cache-mib", "0")  # every folder decoded again at each pass
    assert torch.equal(torch.get_rng_state(), before)  # the rounds' seeding is scoped
    models = [
        "res/cache/pretrain_seed0.pt",
        *(f"res/runs/{s}/0/round_{r}.pt" for s in ("random", "bald") for r in (1, 2)),
    ]
    assert bytes_of(a, *models) == bytes_of(b, *models)
    # timing columns are measurements, not results: everything else is equal
    assert _results_without_timing(a) == _results_without_timing(b)
    for s in ("random", "bald"):
        rec = [json.loads((f / f"res/runs/{s}/0/round_2.json").read_text()) for f in (a, b)]
        assert rec[0]["selected_paths"] == rec[1]["selected_paths"]


def test_training_leaves_the_callers_rng_as_it_was():
    from alfk_cli.models.archs import build_model, get_arch
    from alfk_cli.simulate.folderround import fit
    from alfk_cli.train.loops import default_config
    from alfk_cli.train.sources import ImageSource

    x = torch.randint(0, 255, (12, 1, 28, 28), dtype=torch.uint8)
    y = torch.arange(12) % 3
    src = ImageSource.from_tensors(x, y, get_arch("lenet").input)
    cfg = default_config("lenet", epochs=1, seed=4, workers=0)
    weights = []
    for caller_seed in (123, 321):  # two callers in different RNG states
        torch.manual_seed(caller_seed)
        before = torch.get_rng_state()
        model = build_model("lenet", 3, seed=0)
        fit(model, src, src, cfg, torch.device("cpu"))
        assert torch.equal(torch.get_rng_state(), before)  # dropout drew from a forked RNG
        weights.append(model.state_dict())
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_seeded_restores_the_global_rng():
    torch.manual_seed(1)
    expected = torch.rand(3)
    torch.manual_seed(1)
    with seeded(99):
        inside = torch.rand(3)
    assert torch.equal(torch.rand(3), expected)
    with seeded(99):
        assert torch.equal(torch.rand(3), inside)


def test_created_stamp_is_empty_unless_source_date_epoch(monkeypatch):
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    assert created_stamp() == ""
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "86400")
    assert created_stamp() == "1970-01-02T00:00:00+00:00"
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "yesterday")
    with pytest.raises(AlfkError, match="SOURCE_DATE_EPOCH"):
        created_stamp()


@pytest.mark.parametrize("workers", [0, 2])
def test_streamed_training_gives_the_preloaded_weights(inputs, monkeypatch, workers):
    """Images streamed by a DataLoader (folders too big to preload) train to the same weights
    as preloaded ones: the loader keeps row order and draws nothing from the dropout RNG."""
    from alfk_cli.data.scan import scan_images
    from alfk_cli.models.archs import build_model, get_arch
    from alfk_cli.train.loops import default_config, train_classifier

    data, val = scan_images(inputs / "lab"), scan_images(inputs / "val")
    spec = get_arch("lenet").input
    cfg = default_config("lenet", epochs=2, batch_size=5, seed=3, workers=workers)
    weights = []
    for streamed in (False, True):
        monkeypatch.setattr("alfk_cli.data.decode.fits_in_memory", lambda *_a, s=streamed: not s)
        model = build_model("lenet", 3, seed=0)
        train_classifier(model, data, val, spec, cfg, torch.device("cpu"))
        weights.append(model.state_dict())
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
