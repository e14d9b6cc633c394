"""The oracle simulation of active learning on a labelled pool (docs/algorithm.md §8-10).

The pool folder has class sub-folders, but a strategy only sees the labels of the images it has
selected. Per seed: build the (optionally biased, §9) pool by choosing rows, make the initial
model (rotation-pretrained on that pool, or fresh), then for rounds b = 1..B select P new rows
with the strategy and the current model, reveal their labels, fine-tune from the previous
round's model on everything labelled so far (fresh optimiser, restarted schedule, §8) keeping the
epoch with the best *validation* accuracy, and evaluate on the test folder.

Every folder is decoded once when it is loaded (failures are skipped and listed) and kept in
memory when it fits in ``cache_mib``; a folder over it is decoded again, batch by batch, at each
pass that reads it (``simulate.data``). The results are the same either way.

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

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from alfk_cli.data.decode import fits_in_memory, image_bytes
from alfk_cli.data.inputspec import InputSpec
from alfk_cli.data.names import printable
from alfk_cli.errors import AlfkError
from alfk_cli.models.archs import build_model, get_arch, resolve_taps, scale_dims
from alfk_cli.models.freeze import frozen_names
from alfk_cli.models.nets import TapNet
from alfk_cli.simulate.activations import ActivationCache
from alfk_cli.simulate.data import Folder, biased_rows, load_folder, resolve_rare
from alfk_cli.simulate.folderround import FolderRound, fit, logits_of
from alfk_cli.simulate.initmodel import FirstModel, initial_model
from alfk_cli.simulate.options import NOT_COMPARED, SimulateOptions
from alfk_cli.simulate.results import (
    RESULT_FIELDS,
    claim_folder,
    clean,
    collect,
    finished_rounds,
    write_json,
    write_results,
)
from alfk_cli.strategies.registry import Strategy, checked_rows
from alfk_cli.train.loops import default_config
from alfk_cli.util.atomic import atomic_output
from alfk_cli.util.devices import resolve_device
from alfk_cli.util.reproducible import save_torch, seeded

__all__ = ["simulate"]

Progress = Callable[[str], None]


def _round_seed(seed: int, round_: int) -> int:
    return int(seed) * 100_003 + int(round_)


@dataclass
class _Folders:
    """The folders, shared by every seed and strategy, and the memory budget they left."""

    val: Folder
    test: Folder
    pool: Folder
    rare: list[int]
    test_rare: torch.Tensor
    spare: int  # bytes of the memory budget the held folders left

    @property
    def classes(self) -> list[str]:
        return self.val.images.classes

    def hold(self, n: int) -> bool:
        """Whether a set of ``n`` pool images read many times (a round's training set) is
        decoded once and kept: only when the pool is streamed and they fit in what is left."""
        return self.pool.x is None and fits_in_memory(n, self.pool.spec, self.spare)


def _load(options: SimulateOptions, spec: InputSpec, dev: torch.device, say: Progress) -> _Folders:
    """Decode the folders once (skipping and listing what fails), keeping in memory those that
    fit in the budget, in the order they are read most: validation, test, pool."""
    say("decoding the validation, test and pool folders")
    workers, budget = options.workers, int(options.cache_mib * (1 << 20))
    folders: list[Folder] = []
    for root, what in ((options.val, "validation"), (options.test, "test"), (options.pool, "pool")):
        classes = folders[0].images.classes if folders else None
        folder = load_folder(root, spec, classes, workers, what, budget)
        budget -= folder.held_bytes
        if folder.x is None:
            mib = len(folder) * image_bytes(spec) / (1 << 20)
            say(f"the {what} folder ({mib:.0f} MiB decoded) is over the memory budget: it is "
                "decoded again, batch by batch, at each pass")  # fmt: skip
        elif dev.type == "cuda":  # keep the decoded images on the GPU for the whole run
            folder.x = folder.x.to(dev)
        folders.append(folder)
    val, test, pool = folders
    for folder in folders:
        for path, reason in folder.images.skipped:
            say(f"warning: skipped {printable(str(folder.images.root / path))}: {reason}")
    rare = resolve_rare(options.rare, val.images.classes)
    test_rare = torch.from_numpy(np.isin(test.y.numpy(), rare))
    return _Folders(val, test, pool, rare, test_rare, budget)


def simulate(options: SimulateOptions, *, progress: Progress | None = None) -> list[dict]:
    """Run (or resume) the simulation; returns every result row, sorted by (strategy as given,
    seed, round). See the module docstring for the outputs."""
    say = progress or (lambda _msg: None)
    spec = get_arch(options.arch).input
    taps = resolve_taps(options.arch, options.taps)
    dev = resolve_device(options.device)
    out = Path(options.out)
    claim_folder(out, options.config(), NOT_COMPARED)
    data = _load(options, spec, dev, say)
    cache = None
    if options.freeze != "none":
        frozen = frozen_names(list(get_arch(options.arch).tap_dims), options.freeze)
        cache = ActivationCache(frozen, taps, data.spare, out / "cache", dev, say)
    for seed in options.seeds:
        keep = biased_rows(data.pool.y.numpy(), data.rare, options.imbalance, seed)
        if options.rounds * options.P > len(keep):
            raise AlfkError(
                f"{options.rounds} rounds of P={options.P} need {options.rounds * options.P} "
                f"pool images; the pool of seed {seed} has {len(keep)}"
            )
        pool_y = data.pool.y[torch.from_numpy(keep)]
        base = partial(
            FolderRound, spec=spec, taps=taps, dims=scale_dims(options.arch, taps),
            val=data.val, pool=data.pool, keep=keep, pool_y=pool_y,
            pool_names=[data.pool.images.paths[i] for i in keep], device=dev,
            mc_samples=int(options.mc_samples), num_classes=len(data.classes),
        )  # fmt: skip
        n_rare = int(np.isin(pool_y.numpy(), data.rare).sum())
        say(f"seed {seed}: pool of {len(keep)} images ({n_rare} of rare classes)")
        hold = data.hold(len(keep))
        make = partial(initial_model, options, data.classes, seed, data.pool, keep, hold, dev, say)
        first = FirstModel(make)
        for st in options.parsed:
            _run_strategy(options, st, seed, keep, base, data, first, say, cache)
    rows = collect(out, options.parsed, options.seeds, options.rounds)
    write_results(out, rows)
    return rows


def _run_strategy(
    options: SimulateOptions,
    st: Strategy,
    seed: int,
    keep: np.ndarray,
    base: Callable[..., FolderRound],
    data: _Folders,
    first_model: Callable[[], TapNet],
    say: Progress,
    cache: ActivationCache | None = None,
) -> None:
    """Every unfinished round of one strategy and seed, resuming after the last finished one.
    ``base`` makes the seed's round data from a model and the labelled mask; ``cache`` holds
    the frozen stages' activations (``--freeze``), made once per frozen model."""
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
    tables = None
    if cache is not None:
        tables = cache.tables(model, data.val, data.test, data.pool, keep)
    rd = base(model=model, labelled=labelled, frozen=tables)
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
    rd: FolderRound,
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
    # fit seeds (and scopes) torch's RNG with cfg.seed itself
    cfg = default_config(
        options.arch,
        epochs=options.epochs,
        seed=rs,
        workers=options.workers,
        eval_every=options.eval_every,
        balance=options.balance, freeze=options.freeze,
        batch_size=options.batch_size, lr=options.lr,
    )  # fmt: skip
    t0 = time.perf_counter()
    train = rd.source(np.asarray(order, dtype=np.int64), data.hold(len(order)))
    best_epoch, val_acc = fit(rd.net, train, rd.val_source(), cfg, rd.device)
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


def _evaluate(rd: FolderRound, data: _Folders) -> dict[str, Any]:
    """Test accuracy: overall, on the rare classes, and per class."""
    test = data.test
    hit = logits_of(rd.net, rd.test_source(test), rd.device).argmax(1) == test.y
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
