"""Extension points: a toy strategy, kernel, estimator and architecture, each registered from
this test module in one object, run through the real ``alfk`` entry point."""

from __future__ import annotations

import importlib.metadata
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from test_descriptors import _reference as autograd_reference
from torch import nn

from alfk_cli.data.decode import load_image, normalizer
from alfk_cli.data.inputspec import InputSpec
from alfk_cli.errors import AlfkError
from alfk_cli.features.estimators import ESTIMATORS, Estimator, register_estimator
from alfk_cli.models.archs import ARCHITECTURES, register_arch, resolve_taps
from alfk_cli.models.checkpoint import load_checkpoint, task_model
from alfk_cli.models.nets import TapNet
from alfk_cli.store.reader import open_store
from alfk_cli.strategies.kernels import KERNELS, Kernel, register_kernel
from alfk_cli.strategies.registry import STRATEGIES, Picked, Strategy, register_strategy
from alfk_cli.util.registry import Registry, UnknownName
from conftest import make_labelled


@pytest.fixture
def world(small_world):
    return small_world


@pytest.fixture
def registered():
    """Register toy objects for one test, and remove them afterwards."""
    added: list[tuple[Registry, str]] = []

    def add(registry: Registry, name: str) -> None:
        added.append((registry, name))

    yield add
    for registry, name in added:
        registry.unregister(name)


def _stdout_lines(r) -> list[str]:
    assert r.exit_code == 0, r.stderr
    return [ln for ln in r.stdout.splitlines() if ln]


SELECT = (
    "select", "--val", "val", "--pool", "pool", "--model", "init.pt", "--device", "cpu", "--no-ledger",
)  # fmt: skip


# ----------------------------------------------------------------------------- strategy


def test_a_registered_strategy_runs_in_select_and_simulate(cli, world, registered, tmp_path):
    @register_strategy("newest")
    class Newest(Strategy):
        """The available rows with the largest indices: the most recently added images."""

        def choose(self, data, P, seed):
            rows = np.flatnonzero(data.available)[::-1][:P]
            return Picked(rows, np.full(len(rows), np.nan, dtype=np.float32))

    registered(STRATEGIES, "newest")
    assert "newest" in cli("list", "strategies").stdout.splitlines()
    r = cli(*SELECT, "--P", "3", "--strategy", "newest")
    assert _stdout_lines(r) == [f"pool/img{i:04d}.png" for i in (29, 28, 27)]
    Path("sent.txt").write_text("pool/img0029.png\n")
    r = cli(*SELECT, "--P", "2", "--strategy", "newest", "--exclude", "sent.txt")
    assert _stdout_lines(r) == ["pool/img0028.png", "pool/img0027.png"]
    r = cli(*SELECT, "--P", "2", "--strategy", "newest", "--format", "jsonl")
    assert '"score": null' in r.stdout and '"center": ""' in r.stdout

    make_labelled(Path("sim/pool"), ["a", "b"], 6, prefix="p")
    make_labelled(Path("sim/val"), ["a", "b"], 2, prefix="v")
    make_labelled(Path("sim/test"), ["a", "b"], 2, prefix="t")
    r = cli("simulate", "--pool", "sim/pool", "--val", "sim/val", "--test", "sim/test",
            "--strategies", "newest,random", "--rounds", "2", "--P", "2", "--seeds", "0",
            "--init", "random", "--epochs", "1", "--rare", "b", "--device", "cpu",
            "--workers", "0", "--out", "res", "-q")  # fmt: skip
    assert r.exit_code == 0, r.stderr
    import json

    rec = json.loads(Path("res/runs/newest/0/round_2.json").read_text())
    # the pool rows are the folder's rows (a/p0000..p0005, b/p0000..p0005): newest = 11, 10, 9, 8
    assert rec["labelled_rows"] == [11, 10, 9, 8]


def test_unknown_strategy_is_a_usage_error_naming_the_known_ones(cli, world):
    r = cli(*SELECT, "--P", "3", "--strategy", "newest")
    assert r.exit_code == 2
    assert "unknown strategy 'newest'; choose one of random, entropy" in r.stderr


# ----------------------------------------------------------------------------- kernel


def _reference_walk(val_g, pool_g, centres, P):
    """Brute force: standardise g, score every (centre, pool row) in float64, walk rank-major."""

    def std(x):
        x = np.asarray(x, dtype=np.float64)
        x = x - x.mean(axis=1, keepdims=True)
        sd = x.std(axis=1, ddof=1, keepdims=True)
        return np.divide(x, sd, out=np.zeros_like(x), where=sd > 0)

    s = std(val_g[centres]) @ std(pool_g).T
    lists = [sorted(range(s.shape[1]), key=lambda j, c=c: (-s[c, j], j)) for c in range(len(s))]
    taken: list[int] = []
    for r in range(s.shape[1]):
        for c in sorted(range(len(s)), key=lambda c: (-s[c, lists[c][r]], c)):
            j = lists[c][r]
            if j not in taken and len(taken) < P:
                taken.append(j)
    return taken


def test_a_registered_kernel_selects_like_a_brute_force_reference(cli, world, registered):
    @register_kernel("fisher")
    class FisherOnly(Kernel):
        """R_g alone: the Fisher scores' correlation, no features."""

        def combine(self, rz, rg):
            return rg

    registered(KERNELS, "fisher")
    common = ("--model", "init.pt", "--device", "cpu", "--taps", "L20")
    assert cli("embed", "--images", "val", "--out", "val.h5", *common).exit_code == 0
    r = cli("embed", "--images", "pool", "--out", "pool.h5", "--reference", "val.h5", *common)
    assert r.exit_code == 0, r.stderr
    with h5py.File("val.h5") as v, h5py.File("pool.h5") as p:
        val_g, pool_g = v["g"][:], p["g"][:]
        wrong = np.flatnonzero(v["logits"][:].argmax(1) != v["labels"][:])
    P = max(12, len(wrong))  # every misclassified image is a centre (no k-center step)
    r = cli("score", "--val", "val.h5", "--pool", "pool.h5", "--P", str(P), "--out", "s.h5",
            "--kernel", "fisher", "--device", "cpu")  # fmt: skip
    assert r.exit_code == 0, r.stderr
    with h5py.File("s.h5") as f:
        assert f.attrs["kernel"] == "fisher"
        assert list(f["centers"][:]) == list(wrong)
        assert list(f["selected"][:]) == _reference_walk(val_g, pool_g, wrong, P)


# ----------------------------------------------------------------------------- estimator


def test_a_registered_estimator_labels_the_pool_g(cli, world, registered):
    @register_estimator("first")
    class FirstClass(Estimator):
        """Every image gets class 0."""

        def labels(self, batch):
            return lambda z, logits: torch.zeros(len(z), dtype=torch.long, device=z.device)

    registered(ESTIMATORS, "first")
    common = ("--model", "init.pt", "--device", "cpu", "--seed", "0")
    assert cli("embed", "--images", "val", "--out", "val.h5", *common).exit_code == 0
    for name in ("first", "yhat"):
        r = cli("embed", "--images", "pool", "--out", f"{name}.h5", "--reference", "val.h5",
                "--pseudo-label", name, *common)  # fmt: skip
        assert r.exit_code == 0, r.stderr
    with h5py.File("first.h5") as a, h5py.File("yhat.h5") as b:
        assert a.attrs["pseudo_label"] == "first"
        assert np.array_equal(a["z"][:], b["z"][:])  # same forward pass, other labels
        g = a["g"][:]
        paths = [p.decode() for p in a["paths"][:]]
    # independent reference: per-image autograd of CE(logits, class 0) back to the taps
    ckpt = load_checkpoint("init.pt")
    model = task_model(ckpt, ["a", "b", "c"], seed=0).eval()
    norm = normalizer(ckpt.input)
    x = torch.cat([norm(load_image(Path("pool") / p, ckpt.input)[None]) for p in paths])
    taps = resolve_taps("lenet", None)
    _, g_ref, _ = autograd_reference(model, x, taps, torch.zeros(len(x), dtype=torch.long))
    assert np.allclose(g, g_ref, rtol=1e-4, atol=1e-6)
    r = cli(*SELECT, "--P", "3", "--pseudo-label", "first", "--workdir", "wd")
    assert r.exit_code == 0, r.stderr
    with h5py.File("wd/pool.h5") as f:
        assert f.attrs["pseudo_label"] == "first"


# ----------------------------------------------------------------------------- architecture


def test_a_registered_architecture_trains_and_embeds_with_widths_from_the_network(
    cli, world, registered
):
    @register_arch(
        "tiny",
        input=InputSpec(16, 1, (0.5,), (0.5,)),
        presets={"L11": ("conv", "fc")},
        default_preset="L11",
        train_defaults={"lr": 0.05, "momentum": 0.5, "weight_decay": 0.0, "batch_size": 8},
    )
    def build_tiny(num_classes: int) -> TapNet:
        stages = [
            ("conv", nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.MaxPool2d(2))),
            ("fc", nn.Sequential(nn.Flatten(), nn.Linear(4 * 7 * 7, 7), nn.ReLU())),
        ]
        return TapNet(stages, nn.Identity(), nn.Linear(7, num_classes))

    registered(ARCHITECTURES, "tiny")
    assert ARCHITECTURES["tiny"].tap_dims == {"conv": 4, "fc": 7}
    make_labelled(Path("train"), ["a", "b", "c"], 4, prefix="t")
    r = cli("train", "--data", "train", "--val", "val", "--arch", "tiny", "--epochs", "1",
            "--out", "tiny.pt", "--device", "cpu", "--workers", "0")  # fmt: skip
    assert r.exit_code == 0, r.stderr
    r = cli("embed", "--images", "val", "--model", "tiny.pt", "--out", "v.h5", "--device", "cpu")
    assert r.exit_code == 0, r.stderr
    with open_store("v.h5") as store:
        assert store.scale_dims == [4, 7] and store.z.shape == (12, 11)
    r = cli(*SELECT[:5], "--P", "2", "--model", "tiny.pt", "--device", "cpu", "--taps", "fc")
    assert r.exit_code == 0, r.stderr


# ----------------------------------------------------------------------------- the registry


def test_registry_names_errors_and_entry_points(tmp_path, monkeypatch):
    reg: Registry[int] = Registry("widget", "alfk.widgets")
    reg.register("one")(1)
    with pytest.raises(ValueError, match="already registered"):
        reg.register("one")(2)
    reg.register("one", replace=True)(3)
    with pytest.raises(ValueError, match="without"):
        reg.register("a:b")
    # a plug-in package: an entry point naming a module that registers on import
    (tmp_path / "toy_widgets.py").write_text(
        "from tests_registry_target import REG\nREG.register('two')(2)\n"
    )
    target = type(sys)("tests_registry_target")
    target.REG = reg
    monkeypatch.setitem(sys.modules, "tests_registry_target", target)
    monkeypatch.syspath_prepend(str(tmp_path))
    ep = importlib.metadata.EntryPoint("toy", "toy_widgets", "alfk.widgets")
    monkeypatch.setattr(
        importlib.metadata, "entry_points", lambda group: [ep] if group == "alfk.widgets" else []
    )
    assert reg.names() == ("one", "two") and reg["one"] == 3 and "two" in reg
    with pytest.raises(UnknownName, match="unknown widget 'three'; choose one of one, two"):
        reg["three"]
    assert isinstance(UnknownName("x"), AlfkError)
    broken = Registry("gadget", "alfk.gadgets")
    bad = importlib.metadata.EntryPoint("bad", "no_such_module_xyz", "alfk.gadgets")
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: [bad])
    with pytest.raises(AlfkError, match="cannot load gadget plug-in 'bad'"):
        broken.names()


def test_registered_names_read_no_entry_points(monkeypatch):
    groups: list[str] = []
    monkeypatch.setattr(
        importlib.metadata, "entry_points", lambda group: groups.append(group) or []
    )
    reg: Registry[int] = Registry("widget", "alfk.widgets")
    reg.register("one")(1)
    assert "one" in reg and reg["one"] == 1 and reg.get("one") == 1
    assert groups == []  # a built-in name is known without the installed packages' metadata
    assert "two" not in reg and groups == ["alfk.widgets"]
    assert reg.names() == ("one",) and groups == ["alfk.widgets"]  # read once


def test_builtins_are_registered_like_plugins():
    assert ARCHITECTURES.names() == ("lenet", "resnet10", "resnet18")
    assert KERNELS.names() == ("sum", "pcc", "product")
    assert ESTIMATORS.names() == ("true", "yhat", "p_yz", "p_yz_knn", "mc_trace", "mc_mi")
    assert STRATEGIES.names() == (
        "random", "entropy", "margin", "varR", "bald", "coreset", "balanced-entropy", "badge",
        "similar", "fk", "pcc",
    )  # fmt: skip
    # tap widths are read off the built networks
    assert ARCHITECTURES["lenet"].tap_dims == {"conv1": 10, "conv2": 20, "fc1": 50}
    assert ARCHITECTURES["resnet10"].tap_dims == {
        "stem": 64, "layer1": 64, "layer2": 128, "layer3": 256, "layer4": 512,
    }  # fmt: skip
