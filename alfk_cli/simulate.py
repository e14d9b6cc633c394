"""The oracle simulation of active learning on a labelled pool (docs/algorithm.md §8-10).

The pool folder has class sub-folders, but a strategy only sees the labels of the images it has
selected. Per seed: build the (optionally biased, §9) pool by choosing rows, make the initial
model (rotation-pretrained on that pool, or fresh), then for rounds b = 1..B select P new rows
with the strategy and the current model, reveal their labels, fine-tune from the previous
round's model on everything labelled so far (fresh optimiser, restarted schedule, §8) keeping the
epoch with the best *validation* accuracy, and evaluate on the test folder.

Every folder is decoded once into a uint8 tensor and reused by all seeds, strategies and rounds.

Outputs under ``out_dir``::

    config.json                               the arguments (a re-run must repeat them)
    cache/pretrain_seed<S>.pt                 rotation-pretrained initial model per seed
    runs/<strategy>/<seed>/round_<b>.pt       model state after round b
    runs/<strategy>/<seed>/round_<b>.json     {"row": result row, "labelled_rows": [...], ...}
    results.jsonl, results.csv                every finished row, sorted (rewritten each round)

A round's ``.json`` (written after its ``.pt``) marks it finished; a re-run with the same arguments
continues after the last finished round of each (strategy, seed). Each round reseeds every RNG
from (seed, round), so a resumed run gives the same results. ``model_passes``: see strategies.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from alfk_cli.atomic import atomic_output
from alfk_cli.balance import check_balance
from alfk_cli.devices import resolve_device
from alfk_cli.errors import AlfkError
from alfk_cli.models import InputSpec, TapNet, build_model, get_arch, resolve_taps, scale_dims
from alfk_cli.names import printable
from alfk_cli.reproducible import save_torch, seeded
from alfk_cli.simulate_data import Folder, biased_rows, load_folder, resolve_rare
from alfk_cli.simulate_results import (
    RESULT_COLUMNS,
    RESULT_FIELDS,
    claim_folder,
    clean,
    collect,
    finished_rounds,
    read_results,
    rows_to_csv,
    write_json,
    write_results,
)
from alfk_cli.simulate_round import MemoryRound, fit, logits_of
from alfk_cli.strategies import Strategy, checked_rows, make_strategy
from alfk_cli.training import ROTNET_MILESTONES, default_config, rotate_batch, split_holdout

__all__ = [
    "RESULT_COLUMNS",
    "RESULT_FIELDS",
    "Folder",
    "SimulateOptions",
    "biased_rows",
    "fit",
    "load_folder",
    "read_results",
    "resolve_rare",
    "rows_to_csv",
    "simulate",
]

#: How each seed's initial model is made: rotation pretraining on the pool, or random weights.
InitName = Literal["pretrain", "random"]
INITS: tuple[InitName, ...] = ("pretrain", "random")
# Options that change how a run is computed, not what it computes (not compared on resume).
_NOT_COMPARED = ("device", "workers")

Progress = Callable[[str], None]


@dataclass(frozen=True, kw_only=True)
class SimulateOptions:
    """Everything a simulation run depends on (``config.json`` is its serialised form)."""

    pool: str | Path
    val: str | Path
    test: str | Path
    out: str | Path
    strategies: tuple[str, ...] = ("random", "fk:p_yz")
    rounds: int = 10
    P: int = 125
    seeds: tuple[int, ...] = (0,)
    arch: str = "lenet"
    taps: str | tuple[str, ...] | None = None
    init: InitName = "pretrain"
    epochs: int = 50
    pretrain_epochs: int = 8
    eval_every: int = 1
    batch_size: int | None = None  # the arch's; in config.json only when set (runs resume)
    lr: float | None = None  # likewise
    balance: str = "none"  # class balancing of each round's training (balance.py)
    imbalance: float | None = None
    rare: tuple[str | int, ...] = (5, 6, 7, 8, 9)
    mc_samples: int = 32
    device: str = "auto"
    workers: int | None = None
    parsed: tuple[Strategy, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "parsed", tuple(make_strategy(s) for s in self.strategies))
        self._check()

    def _check(self) -> None:
        if not self.parsed:
            raise AlfkError("give at least one strategy")
        if len({s.name for s in self.parsed}) != len(self.parsed):
            raise AlfkError("a strategy is named twice")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise AlfkError("give one or more distinct seeds")
        for name in ("rounds", "P", "epochs", "eval_every", "batch_size"):
            if getattr(self, name) is not None and int(getattr(self, name)) < 1:
                raise AlfkError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.lr is not None and not self.lr > 0:
            raise AlfkError(f"lr must be positive, got {self.lr}")
        check_balance(self.balance)
        if self.init not in INITS:
            raise AlfkError(f"init must be pretrain or random, not {self.init!r}")
        if self.init == "pretrain" and self.pretrain_epochs < 1:
            raise AlfkError("pretrain_epochs must be at least 1")
        if self.imbalance is not None and not self.imbalance > 0:
            raise AlfkError(f"the imbalance ratio must be positive, got {self.imbalance}")
        if any(s.uses_mc for s in self.parsed) and self.mc_samples < 2:
            raise AlfkError("mc_samples must be at least 2")

    def config(self) -> dict[str, Any]:
        """The options as written to ``config.json``; a re-run must repeat them."""
        return {
            "pool": str(Path(self.pool).resolve()),
            "val": str(Path(self.val).resolve()),
            "test": str(Path(self.test).resolve()),
            "strategies": [s.name for s in self.parsed],
            "rounds": int(self.rounds),
            "P": int(self.P),
            "seeds": [int(s) for s in self.seeds],
            "arch": self.arch,
            "taps": list(resolve_taps(self.arch, self.taps)),
            "init": self.init,
            "epochs": int(self.epochs),
            "pretrain_epochs": int(self.pretrain_epochs) if self.init == "pretrain" else None,
            "eval_every": int(self.eval_every),
            **({"batch_size": int(self.batch_size)} if self.batch_size is not None else {}),
            **({"lr": float(self.lr)} if self.lr is not None else {}),
            **({"balance": self.balance} if self.balance != "none" else {}),
            "imbalance": None
            if self.imbalance is None or self.imbalance == 1
            else float(self.imbalance),
            "rare": [str(r) for r in self.rare],
            "mc_samples": int(self.mc_samples),
            "device": self.device,
            "workers": self.workers,
        }


def _round_seed(seed: int, round_: int) -> int:
    return int(seed) * 100_003 + int(round_)


def _initial_model(
    options: SimulateOptions,
    classes: list[str],
    seed: int,
    pool_x: torch.Tensor,
    spec: InputSpec,
    device: torch.device,
    say: Progress,
) -> TapNet:
    """A fresh model (``init="random"``), or the pool's rotation-pretrained one, cached per seed."""
    init, arch, out = options.init, options.arch, Path(options.out)
    pretrain_epochs = options.pretrain_epochs
    if init == "random":
        return build_model(arch, len(classes), seed=seed)
    from alfk_cli.checkpoint import ROTATION_CLASSES, load_checkpoint, save_checkpoint, task_model

    path = out / "cache" / f"pretrain_seed{seed}.pt"
    if not path.is_file():
        if len(pool_x) < 2:
            raise AlfkError("rotation pretraining needs at least 2 pool images")
        say(f"seed {seed}: rotation-pretraining {arch} on {len(pool_x)} pool images")
        t0 = time.perf_counter()
        model = build_model(arch, len(ROTATION_CLASSES), seed=seed)
        cfg = default_config(
            arch,
            epochs=pretrain_epochs,
            seed=seed,
            workers=options.workers,
            milestones=ROTNET_MILESTONES,
            eval_every=options.eval_every,
        )
        tr, held = split_holdout(len(pool_x), 0.1, seed)
        tr_t, held_t = torch.from_numpy(tr), torch.from_numpy(held)
        dummy = torch.zeros(len(pool_x), dtype=torch.long)  # rotate_batch makes the labels
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            epoch, acc = fit(
                model,
                pool_x[tr_t],
                dummy[tr_t],
                pool_x[held_t],
                dummy[held_t],
                spec,
                cfg,
                device,
                transform=rotate_batch,
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        info = {
            "task": "pretrain",
            "images_count": len(pool_x),
            "epochs": pretrain_epochs,
            "seed": seed,
            "best_epoch": epoch,
            "rotation_accuracy": acc,
        }
        save_checkpoint(path, model.cpu(), arch, list(ROTATION_CLASSES), "rotation", info)
        say(
            f"seed {seed}: rotation accuracy {100 * acc:.1f}% (epoch {epoch}), "
            f"{time.perf_counter() - t0:.1f} s"
        )
    return task_model(load_checkpoint(path, arch), classes, seed=seed)


@dataclass
class _Folders:
    """The decoded folders, shared by every seed and strategy."""

    val: Folder
    test: Folder
    pool: Folder
    rare: list[int]
    test_rare: torch.Tensor

    @property
    def classes(self) -> list[str]:
        return self.val.images.classes


def _load(options: SimulateOptions, spec: InputSpec, dev: torch.device, say: Progress) -> _Folders:
    say("decoding the validation, test and pool folders")
    workers = options.workers
    val = load_folder(options.val, spec, None, workers, "validation")
    classes = val.images.classes
    test = load_folder(options.test, spec, classes, workers, "test")
    pool = load_folder(options.pool, spec, classes, workers, "pool")
    for folder in (val, test, pool):
        for path, reason in folder.images.skipped:
            say(f"warning: skipped {printable(str(folder.images.root / path))}: {reason}")
    rare = resolve_rare(options.rare, classes)
    test_rare = torch.from_numpy(np.isin(test.y.numpy(), rare))
    if dev.type == "cuda":  # keep the decoded images on the GPU for the whole run
        val.x, test.x, pool.x = val.x.to(dev), test.x.to(dev), pool.x.to(dev)
    return _Folders(val, test, pool, rare, test_rare)


def simulate(options: SimulateOptions, *, progress: Progress | None = None) -> list[dict]:
    """Run (or resume) the simulation; returns every result row, sorted by (strategy as given,
    seed, round). See the module docstring for the outputs."""
    say = progress or (lambda _msg: None)
    spec = get_arch(options.arch).input
    taps = resolve_taps(options.arch, options.taps)
    dev = resolve_device(options.device)
    out = Path(options.out)
    claim_folder(out, options.config(), _NOT_COMPARED)
    data = _load(options, spec, dev, say)
    for seed in options.seeds:
        keep = biased_rows(data.pool.y.numpy(), data.rare, options.imbalance, seed)
        if options.rounds * options.P > len(keep):
            raise AlfkError(
                f"{options.rounds} rounds of P={options.P} need {options.rounds * options.P} "
                f"pool images; the pool of seed {seed} has {len(keep)}"
            )
        keep_t = torch.from_numpy(keep)
        base = MemoryRound(
            model=None,  # type: ignore[arg-type]  # set per strategy
            spec=spec,
            taps=taps,
            dims=scale_dims(options.arch, taps),
            val=data.val,
            pool_x=data.pool.x[keep_t.to(data.pool.x.device)],
            pool_y=data.pool.y[keep_t],
            pool_names=[data.pool.images.paths[i] for i in keep],
            device=dev,
            mc_samples=int(options.mc_samples),
            num_classes=len(data.classes),
            labelled=np.zeros(len(keep), dtype=bool),
        )
        n_rare = int(np.isin(base.pool_y.numpy(), data.rare).sum())
        say(f"seed {seed}: pool of {len(keep)} images ({n_rare} of rare classes)")
        first = _FirstModel(options, data.classes, seed, base.pool_x, spec, dev, say)
        for st in options.parsed:
            _run_strategy(options, st, seed, keep, base, data, first, say)
    rows = collect(out, options.parsed, options.seeds, options.rounds)
    write_results(out, rows)
    return rows


class _FirstModel:
    """The seed's initial model, made on first use (a finished seed needs no pretraining)."""

    def __init__(self, options: SimulateOptions, classes: list[str], seed: int, *args: Any):
        self.make = lambda: _initial_model(options, classes, seed, *args)
        self.model: TapNet | None = None

    def __call__(self) -> TapNet:
        if self.model is None:
            self.model = self.make()
        return copy.deepcopy(self.model)


def _run_strategy(
    options: SimulateOptions,
    st: Strategy,
    seed: int,
    keep: np.ndarray,
    base: MemoryRound,
    data: _Folders,
    first_model: Callable[[], TapNet],
    say: Progress,
) -> None:
    """Every unfinished round of one strategy and seed, resuming after the last finished one."""
    out = Path(options.out)
    run_dir = out / "runs" / st.dirname / str(seed)
    done = finished_rounds(run_dir, options.rounds)
    if done == options.rounds:
        say(f"{st.name} seed {seed}: all {options.rounds} rounds done, skipped")
        return
    labelled = np.zeros(len(keep), dtype=bool)
    order: list[int] = []
    if done:
        state = torch.load(run_dir / f"round_{done}.pt", map_location="cpu", weights_only=True)
        model = build_model(options.arch, len(data.classes), seed=0)  # seed: no RNG leak
        model.load_state_dict(state)
        rec = json.loads((run_dir / f"round_{done}.json").read_text())
        where = {int(r): i for i, r in enumerate(keep)}
        order = [where[int(r)] for r in rec["labelled_rows"]]
        labelled[order] = True
        say(f"{st.name} seed {seed}: resuming after round {done}")
    else:
        model = first_model()
    run_dir.mkdir(parents=True, exist_ok=True)
    rd = MemoryRound(**{**base.__dict__, "model": model, "labelled": labelled})
    for b in range(done + 1, options.rounds + 1):
        row, picked = _one_round(options, st, seed, b, rd, order, data)
        with atomic_output(run_dir / f"round_{b}.pt") as tmp:
            save_torch({k: v.cpu() for k, v in model.state_dict().items()}, tmp)
        write_json(
            run_dir / f"round_{b}.json",
            {
                "row": row,
                "labelled_rows": [int(keep[i]) for i in order],
                "selected_paths": [rd.pool_names[i] for i in picked],
            },
        )
        write_results(out, collect(out, options.parsed, options.seeds, options.rounds))
        rare_s = "-" if row["rare_accuracy"] is None else f"{100 * row['rare_accuracy']:.1f}%"
        say(
            f"{st.name} seed {seed} round {b}: {row['labels']} labels, "
            f"test {100 * row['test_accuracy']:.1f}%, rare {rare_s} "
            f"(select {row['select_seconds']:.1f} s, train {row['train_seconds']:.1f} s)"
        )


def _one_round(
    options: SimulateOptions,
    st: Strategy,
    seed: int,
    b: int,
    rd: MemoryRound,
    order: list[int],
    data: _Folders,
) -> tuple[dict, np.ndarray]:
    """Select, reveal, fine-tune and evaluate round ``b``; ``rd`` and ``order`` are updated."""
    rs = _round_seed(seed, b)
    t0 = time.perf_counter()
    with seeded(rs, rd.device):  # scoped: the caller's RNG state is left as it was
        picked_by = st.choose(rd, options.P, rs)
    select_s = time.perf_counter() - t0
    picked = checked_rows(st, picked_by, options.P, rd.available)
    rd.labelled[picked] = True
    order.extend(picked.tolist())
    idx = torch.tensor(order, dtype=torch.long)
    # fit seeds (and scopes) torch's RNG with cfg.seed itself
    cfg = default_config(
        options.arch,
        epochs=options.epochs,
        seed=rs,
        workers=options.workers,
        eval_every=options.eval_every,
        balance=options.balance,
        batch_size=options.batch_size, lr=options.lr,
    )  # fmt: skip
    t0 = time.perf_counter()
    best_epoch, val_acc = fit(
        rd.model,
        rd.pool_x[idx.to(rd.pool_x.device)],
        rd.pool_y[idx],
        data.val.x,
        data.val.y,
        rd.spec,
        cfg,
        rd.device,
    )
    train_s = time.perf_counter() - t0
    row = {
        "strategy": st.name,
        "seed": seed,
        "round": b,
        "labels": len(order),
        **_evaluate(rd, data),
        "val_accuracy": val_acc,
        "pseudo_label_accuracy": picked_by.pseudo_accuracy,
        "batch_histogram": torch.bincount(
            rd.pool_y[torch.from_numpy(picked)], minlength=rd.num_classes
        ).tolist(),
        "select_seconds": round(select_s, 4),
        "model_passes": int(picked_by.passes),
        "train_seconds": round(train_s, 4),
        "best_epoch": best_epoch,
    }
    return {f: row[f] for f in RESULT_FIELDS}, picked


def _evaluate(rd: MemoryRound, data: _Folders) -> dict[str, Any]:
    """Test accuracy: overall, on the rare classes, and per class."""
    test = data.test
    hit = logits_of(rd.model, test.x, rd.spec, rd.device).argmax(1) == test.y
    per_class = [
        hit[test.y == c].float().mean().item() if (test.y == c).any() else math.nan
        for c in range(rd.num_classes)
    ]
    rare = hit[data.test_rare].float().mean().item() if data.test_rare.any() else math.nan
    return {
        "test_accuracy": hit.float().mean().item(),
        "rare_accuracy": clean(rare),
        "per_class": [clean(a) for a in per_class],
    }
