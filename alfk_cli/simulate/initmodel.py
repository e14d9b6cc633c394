"""A simulated seed's initial model: random weights, or rotation-pretrained on its pool (cached)."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from alfk_cli.errors import AlfkError
from alfk_cli.models.archs import build_model
from alfk_cli.models.nets import TapNet
from alfk_cli.simulate.data import Folder
from alfk_cli.simulate.folderround import fit
from alfk_cli.simulate.options import SimulateOptions
from alfk_cli.train.loops import ROTNET_MILESTONES, default_config, rotate_batch, split_holdout

__all__ = ["FirstModel", "initial_model"]

Progress = Callable[[str], None]


def initial_model(
    options: SimulateOptions,
    classes: list[str],
    seed: int,
    pool: Folder,
    keep: np.ndarray,
    hold: bool,
    device: torch.device,
    say: Progress,
) -> TapNet:
    """A fresh model (``init="random"``), or the rotation-pretrained one of the seed's pool
    (rows ``keep`` of ``pool``; ``hold``: decode them once instead of at every epoch), cached
    per seed in the results folder."""
    from alfk_cli.models.archs import ROTATION_CLASSES
    from alfk_cli.models.checkpoint import load_checkpoint, save_checkpoint, task_model

    init, arch, out = options.init, options.arch, Path(options.out)
    if init == "random":
        return build_model(arch, len(classes), seed=seed)
    path = out / "cache" / f"pretrain_seed{seed}.pt"
    if not path.is_file():
        if len(keep) < 2:
            raise AlfkError("rotation pretraining needs at least 2 pool images")
        say(f"seed {seed}: rotation-pretraining {arch} on {len(keep)} pool images")
        t0 = time.perf_counter()
        model = build_model(arch, len(ROTATION_CLASSES), seed=seed)
        cfg = default_config(
            arch, epochs=options.pretrain_epochs, seed=seed, workers=options.workers,
            milestones=ROTNET_MILESTONES, eval_every=options.eval_every,
        )  # fmt: skip
        tr, held = split_holdout(len(keep), 0.1, seed)
        train_src, held_src = pool.source(keep[tr], hold), pool.source(keep[held], hold)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            epoch, acc = fit(
                model, train_src, held_src, cfg, device,
                transform=rotate_batch,
            )  # fmt: skip
        path.parent.mkdir(parents=True, exist_ok=True)
        info = {
            "task": "pretrain",
            "images_count": len(keep),
            "epochs": options.pretrain_epochs,
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


class FirstModel:
    """The seed's initial model, made on first use (a finished seed needs no pretraining)."""

    def __init__(self, make: Callable[[], TapNet]):
        self.make = make
        self.model: TapNet | None = None

    def __call__(self) -> TapNet:
        if self.model is None:
            self.model = self.make()
        return copy.deepcopy(self.model)
