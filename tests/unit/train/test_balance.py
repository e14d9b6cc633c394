"""Class-balanced training: weights, draws, reproducibility, ``auto`` and the CLI option."""

from __future__ import annotations

import dataclasses
import io
import math

import numpy as np
import pytest
import torch

from alfk_cli.errors import AlfkError
from alfk_cli.models.archs import build_model, get_arch
from alfk_cli.models.checkpoint import load_checkpoint
from alfk_cli.train import balance
from alfk_cli.train.loops import TrainConfig, fit
from alfk_cli.train.sources import ImageSource
from conftest import blob_images, make_labelled

SKEW = np.repeat([0, 1, 2], [90, 9, 1])


def test_class_weights_are_inverse_frequencies_with_mean_one():
    w = balance.class_weights(SKEW, 4).numpy().astype(np.float64)
    n, K = 100, 3  # class 3 absent
    np.testing.assert_allclose(w[:3], [n / (K * 90), n / (K * 9), n / (K * 1)], rtol=1e-6)
    assert w[3] == 1.0
    assert math.isclose(float(w[SKEW].mean()), 1.0, rel_tol=1e-6)
    with pytest.raises(AlfkError, match="outside"):
        balance.class_weights(np.array([0, 5]), 3)


def test_weighted_loss_is_the_per_image_weighted_mean():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(12, 3, generator=g)
    y = torch.tensor([0] * 8 + [1] * 3 + [2])
    w = balance.class_weights(y, 3)
    got = float(balance.loss(logits, y, w))
    num = den = 0.0
    for i in range(12):
        logp = float(logits[i, y[i]]) - math.log(sum(math.exp(float(v)) for v in logits[i]))
        num += float(w[y[i]]) * -logp
        den += float(w[y[i]])
    assert math.isclose(got, num / den, rel_tol=1e-5)
    assert not math.isclose(got, float(balance.loss(logits, y, None)), rel_tol=1e-3)


def test_sampling_draws_every_class_equally_often_on_a_skewed_set():
    weights = balance.sample_weights(SKEW, 3)
    gen = torch.Generator().manual_seed(7)
    draws = torch.cat([balance.epoch_order(weights, gen) for _ in range(300)]).numpy()
    freq = np.bincount(SKEW[draws], minlength=3) / len(draws)
    np.testing.assert_allclose(freq, [1 / 3] * 3, atol=0.01)  # 30,000 draws: sd ≈ 0.003
    # the same seed draws the same rows
    again = torch.Generator().manual_seed(7)
    assert torch.equal(balance.epoch_order(weights, again), torch.from_numpy(draws[:100]))


def _state_bytes(model):
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.getvalue()


def _fit(mode, seed=0, start=None):
    x, y = blob_images(60, seed=1)
    keep = np.flatnonzero((y.numpy() == 0) | (np.arange(60) % 6 == 0))  # class 0 dominates
    hx, hy = blob_images(30, seed=2)
    spec = get_arch("lenet").input
    model = build_model("lenet", 3, seed=0)
    if start is not None:
        model.load_state_dict(start)
    cfg = TrainConfig(epochs=3, lr=0.05, batch_size=8, seed=seed, workers=0, balance=mode)
    idx = torch.from_numpy(keep)
    res = fit(
        model,
        ImageSource.from_tensors(x[idx], y[idx], spec),
        ImageSource.from_tensors(hx, hy, spec),
        cfg,
        device=torch.device("cpu"),
    )
    return model, res


@pytest.mark.parametrize("mode", ["reweight", "sample"])
def test_balanced_training_is_byte_reproducible_and_changes_the_weights(mode):
    first, res = _fit(mode)
    assert res.balance == mode
    assert _state_bytes(_fit(mode)[0]) == _state_bytes(first)
    assert _state_bytes(_fit("none")[0]) != _state_bytes(first)
    assert _state_bytes(_fit(mode, seed=1)[0]) != _state_bytes(first)


def test_auto_keeps_the_mode_with_the_best_held_out_accuracy():
    model, res = _fit("auto")
    single = {m: _fit(m) for m in balance.TRAINED_MODES}
    best = max(
        balance.TRAINED_MODES, key=lambda m: (single[m][1].best_accuracy, -"nrs".index(m[0]))
    )
    assert res.balance == best
    assert res.best_accuracy == single[best][1].best_accuracy
    assert _state_bytes(model) == _state_bytes(single[best][0])


def test_balance_is_refused_for_pretraining_and_checked():
    with pytest.raises(AlfkError, match="one of none, reweight, sample, auto"):
        balance.check_balance("equal")
    x, y = blob_images(8, seed=0)
    spec = get_arch("lenet").input
    src = ImageSource.from_tensors(x, y, spec)
    cfg = dataclasses.replace(TrainConfig(epochs=1, workers=0), balance="sample")
    from alfk_cli.train.loops import rotate_batch

    with pytest.raises(AlfkError, match="not to pretraining"):
        fit(
            build_model("lenet", 4),
            src,
            src,
            cfg,
            device=torch.device("cpu"),
            transform=rotate_batch,
        )


def test_cli_train_balance_option(cli, tmp_path):
    data = make_labelled(tmp_path / "data", ["a", "b"], 4)
    make_labelled(data, ["a"], 8)  # a: 8 images, b: 4
    val = make_labelled(tmp_path / "val", ["a", "b"], 3)
    out = tmp_path / "m.pt"
    r = cli("train", "--data", data, "--val", val, "--out", out, "--epochs", "1",
            "--device", "cpu", "--workers", "0", "--balance", "reweight")  # fmt: skip
    assert r.exit_code == 0, r.stderr
    assert load_checkpoint(out).info["balance"] == "reweight" and "balance reweight" in r.stderr
    r = cli("train", "--data", data, "--val", val, "--out", out, "--balance", "equal")
    assert r.exit_code != 0 and "--balance" in r.stderr and "Traceback" not in r.stderr
