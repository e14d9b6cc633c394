"""The oracle simulation harness end to end on tiny random-pixel folders (a CI smoke test)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from alfk_cli.errors import AlfkError
from alfk_cli.simulate import run as sim
from alfk_cli.simulate.results import read_results
from alfk_cli.strategies.registry import FisherKernel, make_strategy
from conftest import make_labelled

CLASSES = ["0", "1", "2", "3"]
RARE = ("2", "3")
TIMING = ("select_seconds", "train_seconds")


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("simdata")
    return {
        "pool": make_labelled(root / "pool", CLASSES, 30, prefix="p"),
        "val": make_labelled(root / "val", CLASSES, 5, prefix="v"),
        "test": make_labelled(root / "test", CLASSES, 5, prefix="t"),
    }


def run(folders, out, strategies=("random", "fk:p_yz"), **kw):
    args = {
        "rounds": 2,
        "P": 5,
        "seeds": [0],
        "init": "random",
        "epochs": 1,
        "imbalance": 2,
        "rare": RARE,
        "mc_samples": 3,
        "device": "cpu",
        "workers": 0,
    }
    args.update(kw)
    options = sim.SimulateOptions(
        pool=folders["pool"],
        val=folders["val"],
        test=folders["test"],
        out=out,
        strategies=tuple(strategies),
        **{k: tuple(v) if isinstance(v, list) else v for k, v in args.items()},
    )
    return sim.simulate(options)


def without_timing(rows):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def test_biased_rows_keeps_floor_nonrare_over_r():
    labels = np.repeat(np.arange(4), [30, 30, 30, 30])
    rows = sim.biased_rows(labels, [2, 3], 7, seed=3)
    kept = labels[rows]
    assert (kept < 2).sum() == 60
    assert np.isin(kept, [2, 3]).sum() == 60 // 7
    assert len(set(rows.tolist())) == len(rows) and (np.diff(rows) > 0).all()
    assert np.array_equal(rows, sim.biased_rows(labels, [2, 3], 7, seed=3))  # seeded
    assert not np.array_equal(rows, sim.biased_rows(labels, [2, 3], 7, seed=4))
    assert len(sim.biased_rows(labels, [2, 3], None, 0)) == 120
    assert len(sim.biased_rows(labels, [2, 3], 1, 0)) == 120


def test_strategy_names_parse_with_defaults_and_fail_with_the_known_names():
    fk = make_strategy("fk")
    assert (fk.name, fk.estimator, fk.kernel, fk.dirname) == ("fk", "p_yz_knn", "sum", "fk")
    pcc = make_strategy("pcc")  # the paper's baseline, whatever fk's defaults
    assert (pcc.name, pcc.estimator, pcc.kernel, pcc.centers) == ("pcc", "p_yz", "pcc", "kcenter")
    assert make_strategy("fk:mc_mi:product").kernel == "product"
    assert make_strategy("fk:mc_mi:product").uses_mc and not make_strategy("fk").uses_mc
    assert make_strategy("fk::pcc").estimator == "p_yz_knn"
    assert make_strategy("fk:yhat").dirname == "fk-yhat"
    assert make_strategy("fk", {"estimator": "yhat", "kernel": "product"}).kernel == "product"
    assert make_strategy("fk:true", {"estimator": "yhat"}).estimator == "true"  # the name wins
    assert make_strategy("fk").centers == "sample"
    assert make_strategy("fk:p_yz::kcenter").centers == "kcenter"
    # names that leave the estimator or centres out are the ones whose meaning changed
    relies = [FisherKernel.relies_on_defaults(n) for n in ("fk", "fk:p_yz", "fk::sum:kcenter",
              "fk:p_yz:sum:kcenter", "fk:p_yz::sample", "random")]  # fmt: skip
    assert relies == [True, True, True, False, False, False]
    assert make_strategy("fk:p_yz_knn::class").centers == "class"
    assert make_strategy("fk:p_yz_knn::class").dirname == "fk-p_yz_knn--class"
    assert make_strategy("varR").uses_mc and not make_strategy("entropy").uses_mc
    for bad, says in (
        ("fk:nope", "unknown pseudo-label estimator 'nope'"),
        ("fk:p_yz:cosine", "unknown kernel 'cosine'; choose one of sum, pcc, product"),
        ("uncertainty", "unknown strategy 'uncertainty'; choose one of random, entropy"),
        ("random:x", "takes no ':' arguments"),
        ("fk:p_yz:sum:x", "unknown centre rule 'x'; use one of kcenter, class, sample"),
        ("fk:p_yz:sum:class:x", "fk[:ESTIMATOR[:KERNEL[:CENTRES]]]"),
    ):
        with pytest.raises(AlfkError, match=re.escape(says)):
            make_strategy(bad)


def test_simulate_end_to_end_and_resume(folders, tmp_path, monkeypatch):
    out = tmp_path / "res"
    rows = run(folders, out)
    assert [(r["strategy"], r["round"]) for r in rows] == [
        ("random", 1),
        ("random", 2),
        ("fk:p_yz", 1),
        ("fk:p_yz", 2),
    ]
    for name in ("results.csv", "results.jsonl", "config.json"):
        assert (out / name).is_file()
    assert [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()] == rows
    assert without_timing(read_results(out / "results.csv")) == without_timing(rows)
    for r in rows:
        assert r["labels"] == 5 * r["round"]
        assert sum(r["batch_histogram"]) == 5 and len(r["batch_histogram"]) == 4
        assert 0 <= r["test_accuracy"] <= 1 and 0 <= r["rare_accuracy"] <= 1
        assert all(0 <= a <= 1 for a in r["per_class"])
        assert 1 <= r["best_epoch"] <= 1
        if r["strategy"] == "random":
            assert r["pseudo_label_accuracy"] is None and r["model_passes"] == 0
        else:
            assert 0 <= r["pseudo_label_accuracy"] <= 1
            # 2·(M + N'): 20 validation images, pool of 60 + 30 minus those labelled
            assert r["model_passes"] == 2 * (20 + 90 - 5 * (r["round"] - 1))
    for strategy in ("random", "fk-p_yz"):
        run_dir = out / "runs" / strategy / "0"
        r1 = json.loads((run_dir / "round_1.json").read_text())["labelled_rows"]
        r2 = json.loads((run_dir / "round_2.json").read_text())["labelled_rows"]
        assert r2[:5] == r1 and len(set(r2)) == 10  # no pool row selected twice
        # rows index the pool folder; the biased pool keeps 60 common + 30 rare images
        assert all(0 <= r < 120 for r in r2)

    # resume: drop the last round of one strategy; only that round is recomputed
    (out / "runs" / "fk-p_yz" / "0" / "round_2.json").unlink()
    (out / "runs" / "fk-p_yz" / "0" / "round_2.pt").unlink()
    calls = []
    real_fit = sim.fit

    def counting_fit(*a, **k):
        calls.append(1)
        return real_fit(*a, **k)

    monkeypatch.setattr(sim, "fit", counting_fit)
    again = run(folders, out)
    assert len(calls) == 1
    assert without_timing(again) == without_timing(rows)
    assert again[:3] == rows[:3]  # finished rounds are read back, not recomputed
    calls.clear()
    assert without_timing(run(folders, out)) == without_timing(rows)
    assert calls == []

    with pytest.raises(AlfkError, match="choose another results folder"):
        run(folders, out, P=4)


def test_every_strategy_runs_one_round(folders, tmp_path):
    strategies = [
        "entropy",
        "margin",
        "varR",
        "bald",
        "coreset",
        "pcc",
        "fk:yhat:product",
        "fk:true",
        "fk:mc_trace",
        "fk:mc_mi:pcc",
        "badge",
        "similar",
        "similar:gcmi",
        "balanced-entropy",
    ]
    rows = run(folders, tmp_path / "all", strategies, rounds=1, imbalance=None)
    assert [r["strategy"] for r in rows] == strategies
    by = {r["strategy"]: r for r in rows}
    assert by["fk:true"]["pseudo_label_accuracy"] == 1.0
    assert by["entropy"]["model_passes"] == 120
    assert by["varR"]["model_passes"] == 3 * 120
    assert by["badge"]["model_passes"] == by["balanced-entropy"]["model_passes"] == 120
    assert by["similar"]["model_passes"] == by["similar:gcmi"]["model_passes"] == 120 + 20
    assert by["fk:mc_trace"]["model_passes"] == 2 * (20 + 120) + 3 * (1 + 4) * 120
    for r in rows:
        assert sum(r["batch_histogram"]) == 5


def test_pretrain_init_is_cached(folders, tmp_path):
    out = tmp_path / "pre"
    rows = run(
        folders, out, ["random"], rounds=1, init="pretrain", pretrain_epochs=1, epochs=3,
        eval_every=2,
    )  # fmt: skip
    assert len(rows) == 1 and (out / "cache" / "pretrain_seed0.pt").is_file()
    assert rows[0]["best_epoch"] in (2, 3)  # validated at epoch 2 and at the last


def test_plot_and_tables(folders, tmp_path):
    pytest.importorskip("matplotlib")
    from alfk_cli.simulate.plot import labels_to_reach, plot_results, summary_table

    rows = [
        {"strategy": s, "seed": seed, "round": b, "labels": 5 * b, "test_accuracy": acc,
         "rare_accuracy": acc / 2}
        for s, base in (("random", 0.5), ("fk", 0.7))
        for seed in (0, 1)
        for b, acc in ((1, base + 0.01 * seed), (2, base + 0.2))
    ]  # fmt: skip
    png = plot_results(rows, tmp_path / "c.png", rare=RARE)
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert labels_to_reach(rows, 0.7) == {"random": 10.0, "fk": 5.0}
    assert labels_to_reach(rows, 0.705) == {"random": None, "fk": 7.5}
    partial = [r for r in rows if (r["strategy"], r["seed"], r["round"]) != ("fk", 0, 2)]
    assert labels_to_reach(partial, 0.705) == {"random": None, "fk": None}  # seed 0 never does
    table = summary_table(rows, RARE)
    assert "| fk |" in table and "5 labels" in table
    assert "90.0 ± 0.0 (45.0)" in table  # fk at 10 labels: test 90%, rare 45%


def test_cli_simulate_and_plot(folders, tmp_path, cli):
    out = tmp_path / "cli"
    res = cli(
        "simulate", "--pool", folders["pool"], "--val", folders["val"], "--test", folders["test"],
        "--strategies", "random,entropy", "--rounds", "1", "--P", "4", "--seeds", "0,1",
        "--init", "random", "--epochs", "1", "--imbalance", "3", "--rare", "2,3",
        "--device", "cpu", "--workers", "0", "--out", out,
    )  # fmt: skip
    assert res.exit_code == 0, res.stderr
    assert "random seed 1 round 1" in res.stderr and res.stdout == ""
    rows = read_results(out)
    assert len(rows) == 4 and (out / "results.csv").is_file()
    assert (out / "curves.png").is_file()
    res = cli("plot", "--results", out, "--out", tmp_path / "p.png")
    assert res.exit_code == 0, res.stderr
    assert (tmp_path / "p.png").is_file() and "| entropy |" in res.stderr
    # folders of separate runs (one per strategy) plot together
    out2 = tmp_path / "cli2"
    res = cli(
        "simulate", "--pool", folders["pool"], "--val", folders["val"], "--test", folders["test"],
        "--strategies", "margin", "--rounds", "1", "--P", "4", "--seeds", "0,1",
        "--init", "random", "--epochs", "1", "--imbalance", "3", "--rare", "2,3",
        "--device", "cpu", "--workers", "0", "--out", out2, "--no-plot",
    )  # fmt: skip
    assert res.exit_code == 0, res.stderr
    assert not (out2 / "curves.png").exists()
    res = cli("plot", "--results", out, "--results", out2 / "results.csv", "-o", tmp_path / "b.png")
    assert res.exit_code == 0, res.stderr
    assert all(f"| {s} |" in res.stderr for s in ("random", "entropy", "margin"))
    assert (tmp_path / "b.png").is_file()
    res = cli("plot", "--results", out, "--results", tmp_path / "missing")
    assert res.exit_code == 1 and "missing" in res.stderr
    res = cli(
        "simulate", "--pool", folders["pool"], "--val", folders["val"], "--test", folders["test"],
        "--strategies", "random", "--rounds", "1", "--P", "4", "--out", out, "--device", "cpu",
    )  # fmt: skip
    assert res.exit_code == 1 and "choose another results folder" in res.stderr
    res = cli("simulate", "--help")
    assert res.exit_code == 0 and "Example:" in res.stdout


def test_simulate_trains_class_balanced_and_records_it(folders, tmp_path, monkeypatch):
    from alfk_cli.train import balance

    draws = []
    real = balance.epoch_order
    monkeypatch.setattr(balance, "epoch_order", lambda w, g: draws.append(w) or real(w, g))
    out = tmp_path / "bal"
    rows = run(folders, out, ["random"], rounds=1, balance="sample")
    assert len(draws) == 1 and len(draws[0]) == 5  # one epoch over the 5 labelled images
    plain = run(folders, tmp_path / "plain", ["random"], rounds=1)
    assert len(draws) == 1
    assert json.loads((out / "config.json").read_text())["balance"] == "sample"
    assert "balance" not in json.loads((tmp_path / "plain" / "config.json").read_text())
    assert rows[0]["batch_histogram"] == plain[0]["batch_histogram"]
    with pytest.raises(AlfkError, match="balance must be one of"):
        run(folders, tmp_path / "bad", ["random"], rounds=1, balance="equal")


def test_streamed_folders_give_the_rows_and_models_of_held_ones(folders, tmp_path):
    """Held in memory, every folder streamed from disk, or only the pool streamed (validation
    and test held; a round's training set decoded once into what is left of the budget): the
    same rows, selections and round models, bit for bit. The strategies cover every RoundData
    read: probs, mc_probs, features, last_layer, validation and fisher (per-image MC keys)."""
    strategies = ["entropy", "bald", "coreset", "similar", "fk:mc_trace"]
    outs = {}
    for name, cache_mib in (("held", sim.SimulateOptions.cache_mib), ("streamed", 0),
                            ("mixed", 0.05)):  # fmt: skip
        outs[name] = tmp_path / name
        rows = run(folders, outs[name], strategies, cache_mib=cache_mib)
        assert len(rows) == 2 * len(strategies)
        if name == "held":
            expected = without_timing(rows)
        else:
            assert without_timing(rows) == expected, name
    for st in strategies:
        for b in (1, 2):
            f = Path("runs", make_strategy(st).dirname, "0", f"round_{b}")
            pt = [(outs[n] / f"{f}.pt").read_bytes() for n in outs]
            assert pt[0] == pt[1] == pt[2], f
            rec = [json.loads((outs[n] / f"{f}.json").read_text()) for n in outs]
            assert rec[0]["selected_paths"] == rec[1]["selected_paths"] == rec[2]["selected_paths"]
    # how, not what: a run may resume with another budget, and a default run records none
    assert "cache_mib" not in json.loads((outs["held"] / "config.json").read_text())
    assert without_timing(run(folders, outs["streamed"], strategies)) == expected
    with pytest.raises(AlfkError, match="cache_mib must be a number of MiB"):
        run(folders, tmp_path / "bad", ["random"], cache_mib=-1)


def test_simulate_batch_size_and_lr_reach_training_and_the_config(folders, tmp_path, monkeypatch):
    from alfk_cli.simulate import folderround

    seen = []
    real = folderround.train_fit
    monkeypatch.setattr(
        folderround,
        "train_fit",
        lambda m, tr, va, cfg, **kw: seen.append(cfg) or real(m, tr, va, cfg, **kw),
    )
    run(folders, tmp_path / "b3", ["random"], rounds=1, batch_size=3, lr=0.01)
    run(folders, tmp_path / "plain", ["random"], rounds=1)
    assert [(c.batch_size, c.lr) for c in seen] == [(3, 0.01), (25, 0.05)]  # lenet's otherwise
    config = json.loads((tmp_path / "b3" / "config.json").read_text())
    assert (config["batch_size"], config["lr"]) == (3, 0.01)
    assert "batch_size" not in json.loads((tmp_path / "plain" / "config.json").read_text())
    with pytest.raises(AlfkError, match="batch_size must be at least 1"):
        run(folders, tmp_path / "bad", ["random"], rounds=1, batch_size=0)
    with pytest.raises(AlfkError, match="lr must be positive"):
        run(folders, tmp_path / "bad", ["random"], rounds=1, lr=0.0)


def test_a_folder_made_under_the_old_fk_defaults_is_not_resumed_with_the_new(tmp_path):
    from alfk_cli.simulate.results import claim_folder

    def config(*strategies):
        return sim.SimulateOptions(pool="p", val="v", test="t", out=tmp_path,
                                   strategies=strategies).config()  # fmt: skip

    assert config("random", "fk:p_yz")["fk_defaults"] == "p_yz_knn:sample"
    spelled = config("random", "fk:p_yz:sum:kcenter", "pcc")
    assert "fk_defaults" not in spelled  # every spelled-out run keeps its config.json
    old = tmp_path / "old"
    claim_folder(old, {k: v for k, v in config("fk:p_yz").items() if k != "fk_defaults"})
    with pytest.raises(AlfkError, match=r"fk_defaults differ"):
        claim_folder(old, config("fk:p_yz"))
