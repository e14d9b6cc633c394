"""Frozen stages (``--freeze``): names, training that leaves them alone, and the simulation's
cached activations against the whole network on the images and per-image autograd."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from alfk_cli.errors import AlfkError
from alfk_cli.models.archs import build_model, get_arch, resolve_taps, scale_dims
from alfk_cli.models.freeze import frozen_digest, frozen_names, tail_net
from alfk_cli.models.nets import pool
from alfk_cli.simulate import run as sim
from alfk_cli.simulate.activations import ActivationCache
from alfk_cli.simulate.data import load_folder
from alfk_cli.simulate.folderround import FolderRound
from alfk_cli.train.loops import default_config, fit
from alfk_cli.train.sources import ImageSource
from conftest import make_labelled

CLASSES = ["a", "b", "c"]


@pytest.fixture(scope="module")
def colour(tmp_path_factory) -> dict[str, Path]:
    """32×32 colour folders (resnet10's input): pool 3×8, val and test 3×3."""
    root = tmp_path_factory.mktemp("colour")
    kw = {"size": 32, "mode": "RGB"}
    return {
        "pool": make_labelled(root / "pool", CLASSES, 8, prefix="p", **kw),
        "val": make_labelled(root / "val", CLASSES, 3, prefix="v", **kw),
        "test": make_labelled(root / "test", CLASSES, 3, prefix="t", **kw),
    }


def _bn_model(arch: str) -> torch.nn.Module:
    model = build_model(arch, len(CLASSES), seed=0)
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():  # non-trivial running statistics: eval-mode BN matters
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    return model


def test_frozen_names_and_the_errors_that_name_the_stages():
    stages = ["conv1", "conv2", "fc1"]
    assert frozen_names(stages, "none") == []
    assert frozen_names(stages, "backbone") == stages
    assert frozen_names(stages, "conv2") == ["conv1", "conv2"]
    with pytest.raises(AlfkError, match=r"'layer9' is not a stage.*conv1, conv2, fc1"):
        frozen_names(stages, "layer9")


@pytest.mark.parametrize("command", ["train", "simulate"])
def test_a_bad_freeze_name_is_a_one_line_usage_error_before_any_work(
    command, cli, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)  # nothing exists: any work would fail otherwise
    args = {
        "train": ["train", "--data", "d", "--val", "v", "--out", "m.pt", "--arch", "resnet10"],
        "simulate": [
            "simulate",
            "--pool",
            "p",
            "--val",
            "v",
            "--test",
            "t",
            "--out",
            "o",
            "--arch",
            "resnet10",
        ],  # explicit: --arch auto must scan the pool first
    }[command]
    r = cli(*args, "--freeze", "layer9")
    assert r.exit_code == 2, r.stderr
    assert "'layer9' is not a stage" in r.stderr and "Traceback" not in r.stderr
    assert not any(tmp_path.iterdir())


def test_train_freeze_backbone_leaves_every_frozen_weight_and_buffer_bit_identical(
    cli, tmp_path, monkeypatch
):
    from alfk_cli.models.checkpoint import load_checkpoint, save_checkpoint

    monkeypatch.chdir(tmp_path)
    make_labelled(Path("data"), CLASSES, 6)
    make_labelled(Path("val"), CLASSES, 3, prefix="v")
    start = build_model("lenet", len(CLASSES), seed=3)
    save_checkpoint("init.pt", start, "lenet", CLASSES, head="classifier")
    before = {k: v.clone() for k, v in start.state_dict().items()}
    for freeze, frozen in (("backbone", ("conv1", "conv2", "fc1")), ("conv2", ("conv1", "conv2"))):
        r = cli("train", "--data", "data", "--val", "val", "--init", "init.pt", "--epochs", "2",
                "--freeze", freeze, "--out", f"{freeze}.pt", "--lr", "0.5")  # fmt: skip
        assert r.exit_code == 0, r.stderr
        ckpt = load_checkpoint(f"{freeze}.pt")
        after = ckpt.state_dict
        for key, value in before.items():
            same = torch.equal(after[key], value)
            assert same == key.startswith(tuple(f"stages.{s}." for s in frozen)), key
        assert ckpt.info["freeze"] == freeze


def test_fit_with_a_frozen_stage_keeps_its_batch_norm_statistics():
    model = _bn_model("resnet10")
    x = torch.randint(0, 256, (12, 3, 32, 32), dtype=torch.uint8)
    src = ImageSource.from_tensors(x, torch.arange(12) % 3, get_arch("resnet10").input)
    frozen = frozen_names(model.stage_names, "layer2")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = default_config("resnet10", epochs=2, batch_size=4, workers=0, freeze="layer2")
    fit(model, src, src, cfg, device=torch.device("cpu"))
    for key, value in model.state_dict().items():
        if key.endswith("num_batches_tracked"):
            continue
        in_frozen = key.startswith(tuple(f"stages.{s}." for s in frozen))
        assert torch.equal(value, before[key]) == in_frozen, key


def _rounds(colour, arch: str, freeze: str, tmp_path: Path) -> tuple[FolderRound, FolderRound]:
    """The same model and pool as a round without and with cached activations."""
    spec = get_arch(arch).input
    val, test, pool_ = (
        load_folder(colour[k], spec, CLASSES, 0, k) for k in ("val", "test", "pool")
    )
    model = _bn_model(arch).eval()
    taps = resolve_taps(arch, None)
    keep = np.arange(2, len(pool_))  # not every pool row: positions must map
    frozen = frozen_names(model.stage_names, freeze)
    cache = ActivationCache(frozen, taps, 1 << 30, tmp_path / "cache", torch.device("cpu"), print)
    tables = cache.tables(model, val, test, pool_, keep)
    assert cache.tables(model, val, test, pool_, keep) is tables  # one fill per frozen model
    other = cache.tables(model, val, test, pool_, keep[1:])  # another seed's pool: refilled
    assert other is not tables and len(other.pool.y) == len(keep) - 1
    common = dict(
        model=model, spec=spec, taps=taps, dims=scale_dims(arch, taps), val=val, pool=pool_,
        keep=keep, pool_y=pool_.y[torch.from_numpy(keep)],
        pool_names=[pool_.images.paths[i] for i in keep], device=torch.device("cpu"),
        mc_samples=3, num_classes=len(CLASSES), labelled=np.zeros(len(keep), bool),
    )  # fmt: skip
    return FolderRound(**common), FolderRound(**common, frozen=tables)


def _close(a, b):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("freeze", ["backbone", "layer1"])  # cut before, at the boundary
def test_cached_activations_give_the_z_g_and_probabilities_of_the_images(colour, tmp_path, freeze):
    images, cached = _rounds(colour, "resnet10", freeze, tmp_path)
    rows = np.array([0, 3, 5, 1])
    labels = torch.tensor([0, 2, 1, 1])
    for method, kw in (("true", {"labels": labels}), ("yhat", {})):
        a = images.describe("pool", rows, method, **kw)
        b = cached.describe("pool", rows, method, **kw)
        for x, y in zip(a, b, strict=True):
            _close(x, y)
    _close(images.describe("val", None, "true", labels=images.val.y)[1],
           cached.describe("val", None, "true", labels=images.val.y)[1])  # fmt: skip
    _close(images.features(), cached.features())
    _close(images.probs(rows), cached.probs(rows))
    for x, y in zip(images.last_layer(rows), cached.last_layer(rows), strict=True):
        _close(x, y)
    for x, y in zip(images.validation(), cached.validation(), strict=True):
        _close(x, y)
    # and against per-image autograd through the whole network on the normalised image
    from alfk_cli.data.decode import normalizer

    z, g, _, used = cached.describe("pool", rows, "true", labels=labels)
    x = normalizer(images.spec)(images.pool.x[torch.from_numpy(images.keep[rows])])
    model = images.model.eval()
    for i in range(len(rows)):
        h, outs = x[i : i + 1], []
        for name in model.stage_names:
            h = model.stages[name](h)
            if name in images.taps:
                h.retain_grad()
                outs.append(h)
        F.cross_entropy(
            model.classifier(model.head(h)), torch.from_numpy(used[i : i + 1])
        ).backward()
        g_ref = torch.cat([pool(t.grad) for t in outs], 1)[0].numpy()
        z_ref = torch.cat([pool(t.detach()) for t in outs], 1)[0].numpy()
        model.zero_grad(set_to_none=True)
        np.testing.assert_allclose(g[i], g_ref, rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(z[i], z_ref, rtol=1e-5, atol=1e-6)
    assert np.abs(g).sum() > 0


def test_the_tail_shares_the_model_weights_and_the_digest_sees_only_frozen_stages():
    model = build_model("lenet", 3, seed=0)
    tail = tail_net(model, "conv2")
    assert tail.stage_names == ["conv2", "fc1"] and tail.stages["fc1"] is model.stages["fc1"]
    key = frozen_digest(model, ["conv1", "conv2"])
    with torch.no_grad():
        model.stages["fc1"][1].weight.add_(1.0)
    assert frozen_digest(model, ["conv1", "conv2"]) == key
    with torch.no_grad():
        model.stages["conv1"].conv.weight.add_(1e-3)
    assert frozen_digest(model, ["conv1", "conv2"]) != key


def _simulate(colour, out: Path, **kw):
    options = sim.SimulateOptions(
        pool=colour["pool"], val=colour["val"], test=colour["test"], out=out,
        strategies=("random", "badge", "fk:p_yz"), rounds=2, P=3,
        seeds=(0, 1), arch="resnet10", init="pretrain", pretrain_epochs=1, epochs=2,
        batch_size=4, imbalance=2, rare=("c",), device="cpu", workers=0, freeze="backbone", **kw,
    )  # fmt: skip
    return sim.simulate(options)


def test_simulate_freeze_backbone_is_reproducible_and_never_moves_the_backbone(colour, tmp_path):
    runs = [_simulate(colour, tmp_path / name) for name in ("a", "b")]
    timing = ("select_seconds", "train_seconds")
    rows = [[{k: v for k, v in r.items() if k not in timing} for r in rs] for rs in runs]
    assert rows[0] == rows[1] and len(rows[0]) == 3 * 2 * 2
    assert json.loads((tmp_path / "a" / "config.json").read_text())["freeze"] == "backbone"
    stages = tuple(f"stages.{s}." for s in build_model("resnet10", 3, seed=0).stage_names)
    for seed in (0, 1):
        start = torch.load(tmp_path / "a" / "cache" / f"pretrain_seed{seed}.pt", weights_only=True)
        start = start.get("state_dict", start)
        for st in ("random", "fk-p_yz"):
            for name in ("a", "b"):
                f = tmp_path / name / "runs" / st / str(seed) / "round_2.pt"
                state = torch.load(f, weights_only=True)
                for key, value in state.items():
                    if key.startswith(stages) and key in start:
                        assert torch.equal(value, start[key]), (f, key)
            pa, pb = (tmp_path / n / "runs" / st / str(seed) / "round_2.pt" for n in "ab")
            assert pa.read_bytes() == pb.read_bytes()
    # a resumed run rebuilds the tables from the saved model and gives the same rows
    (tmp_path / "a" / "runs" / "badge" / "1" / "round_2.json").unlink()
    again = _simulate(colour, tmp_path / "a")
    assert [{k: v for k, v in r.items() if k not in timing} for r in again] == rows[0]


def test_a_bad_freeze_name_under_arch_auto_is_a_usage_error_once_it_has_chosen(
    cli, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    make_labelled(Path("data"), CLASSES, 2)
    make_labelled(Path("val"), CLASSES, 2, prefix="v")
    r = cli("train", "--data", "data", "--val", "val", "--out", "m.pt", "--freeze", "layer9")
    assert r.exit_code == 2 and "'layer9' is not a stage" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and not Path("m.pt").exists()
