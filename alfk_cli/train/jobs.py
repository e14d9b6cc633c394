"""The jobs behind ``alfk train`` and ``alfk pretrain``: image folders in, a checkpoint out.

:func:`train_checkpoint` and :func:`pretrain_checkpoint` take :class:`TrainOptions`, report to an
optional :class:`~alfk_cli.util.progress.ProgressSink` and raise :class:`AlfkError`; they print
nothing. The training loops themselves are in :mod:`alfk_cli.train.loops`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from alfk_cli.data.scan import ImageSet
from alfk_cli.errors import AlfkError
from alfk_cli.train.loops import (
    ROTNET_MILESTONES,
    TrainConfig,
    TrainResult,
    default_config,
    pretrain_rotation,
    train_classifier,
)
from alfk_cli.util import distributed
from alfk_cli.util.progress import ProgressSink

if TYPE_CHECKING:
    from alfk_cli.models.checkpoint import Checkpoint


@dataclass(frozen=True, kw_only=True)
class TrainOptions:
    """What a user chooses for ``train`` or ``pretrain``; None means the architecture's default
    (:func:`default_config`), and ``arch`` None means the ``init`` checkpoint's, else lenet."""

    arch: str | None = None
    epochs: int = 30
    lr: float | None = None
    momentum: float | None = None
    weight_decay: float | None = None
    batch_size: int | None = None
    seed: int = 0
    workers: int | None = None
    balance: str = (
        "none"  # class balancing for ``train`` (train/balance.py); pretraining ignores it
    )
    # why ``--arch auto`` chose ``arch`` (archauto's note): kept in the checkpoint's info as
    # ``arch_auto``; None for an explicit architecture (whose checkpoint bytes stay as they were)
    arch_auto: str | None = None
    freeze: str = (
        "none"  # stages ``train`` leaves as they are (models/freeze.py); pretraining ignores it
    )

    def config(self, arch: str, milestones: tuple[float, ...] | None = None) -> TrainConfig:
        """The resolved configuration for ``arch``."""
        return default_config(
            arch,
            epochs=self.epochs,
            lr=self.lr,
            momentum=self.momentum,
            weight_decay=self.weight_decay,
            batch_size=self.batch_size,
            seed=self.seed,
            workers=self.workers,
            milestones=milestones,
            balance=self.balance,
            freeze=self.freeze,
        )


@dataclass(frozen=True)
class TrainStart:
    """What a training job is about to do, reported before the first epoch."""

    arch: str
    train_images: int
    val_images: int
    classes: list[str]
    device: torch.device
    # the weights not taken from the ``init`` checkpoint (names); empty without one
    fresh: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class TrainReport:
    """The outcome of :func:`train_checkpoint` or :func:`pretrain_checkpoint`."""

    arch: str
    classes: list[str]  # the checkpoint's class names (rotation angles for pretraining)
    config: TrainConfig
    result: TrainResult


def train_checkpoint(
    data: ImageSet,
    val: ImageSet,
    out: str | Path,
    options: TrainOptions,
    *,
    device: torch.device,
    init: Checkpoint | None = None,
    progress: ProgressSink | None = None,
    on_start: Callable[[TrainStart], None] | None = None,
) -> TrainReport:
    """Train a classifier on ``data`` (keeping the best epoch on ``val``) and save it to ``out``.

    The network is ``options.arch`` (else ``init``'s architecture, else lenet), seeded with
    ``options.seed`` and initialised from ``init`` when given (a rotation head or a classifier of
    another shape stays fresh). The model's classes are ``val``'s (``data`` may lack some of
    them, never hold others). ``on_start`` hears what will be trained before the first epoch.
    The checkpoint's ``info`` records the folders, ``init`` and its SHA-256, the configuration
    and the best epoch.
    """
    from alfk_cli.data.scan import align_classes
    from alfk_cli.models.archs import build_model, get_arch
    from alfk_cli.models.checkpoint import init_from, save_checkpoint

    data = align_classes(data, val)  # the classes are val's, in val's order, even those data lacks
    arch = options.arch or (init.arch if init else "lenet")
    if init is not None and init.arch != arch:
        raise AlfkError(f"checkpoint {init.path} was made for {init.arch}, not {arch}")
    cfg = options.config(arch)
    model = build_model(arch, len(data.classes), seed=cfg.seed)
    fresh = init_from(model, init) if init is not None else []
    if on_start is not None:
        on_start(TrainStart(arch, len(data), len(val), list(data.classes), device, fresh))
    result = train_classifier(
        model, data, val, get_arch(arch).input, cfg, device, progress=progress
    )
    info = {
        "task": "train",
        "data": str(data.root),
        "val": str(val.root),
        "init": str(init.path) if init and init.path else "",
        "init_sha256": init.sha256 if init else "",
        "epochs": cfg.epochs,
        "lr": cfg.lr,
        "momentum": cfg.momentum,
        "weight_decay": cfg.weight_decay,
        "batch_size": cfg.batch_size,
        "seed": cfg.seed,
        "balance": result.balance,
        "best_epoch": result.best_epoch,
        "val_accuracy": result.best_accuracy,
        "train_images": len(data),
    }
    if options.arch_auto:
        info["arch_auto"] = options.arch_auto
    if cfg.freeze != "none":  # only then: a checkpoint trained in full keeps its bytes
        info["freeze"] = cfg.freeze
    # under torchrun (DDP) every rank holds the same weights; rank 0 writes them
    distributed.on_main(
        lambda: save_checkpoint(out, model.cpu(), arch, data.classes, "classifier", info)
    )
    return TrainReport(arch, list(data.classes), cfg, result)


def pretrain_checkpoint(
    images: ImageSet,
    out: str | Path,
    options: TrainOptions,
    *,
    device: torch.device,
    holdout: float = 0.1,
    progress: ProgressSink | None = None,
    init: Checkpoint | None = None,
) -> TrainReport:
    """Rotation-pretrain an ``options.arch`` network (else ``init``'s, else lenet) on ``images``
    and save it to ``out``; the learning rate drops at :data:`ROTNET_MILESTONES`. ``init``: its
    trunk weights are the start (the rotation head is fresh)."""
    from alfk_cli.models.archs import ROTATION_CLASSES, build_model, get_arch
    from alfk_cli.models.checkpoint import init_from, save_checkpoint

    arch = options.arch or (init.arch if init else "lenet")
    if init is not None and init.arch != arch:
        raise AlfkError(f"checkpoint {init.path} was made for {init.arch}, not {arch}")
    cfg = options.config(arch, milestones=ROTNET_MILESTONES)
    cfg = dataclasses.replace(cfg, balance="none", freeze="none")
    model = build_model(arch, len(ROTATION_CLASSES), seed=cfg.seed)
    if init is not None:
        init_from(model, dataclasses.replace(init, head="backbone"))  # never its classifier
    result = pretrain_rotation(
        model, images, get_arch(arch).input, cfg, device, holdout=holdout, progress=progress
    )
    info = {
        "task": "pretrain",
        "images": str(images.root),
        "images_count": len(images),
        "epochs": cfg.epochs,
        "lr": cfg.lr,
        "batch_size": cfg.batch_size,
        "seed": cfg.seed,
        "balance": result.balance,
        "best_epoch": result.best_epoch,
        "rotation_accuracy": result.best_accuracy,
    }
    if init is not None:
        info.update(init=str(init.path or ""), init_sha256=init.sha256)
    if options.arch_auto:
        info["arch_auto"] = options.arch_auto
    distributed.on_main(
        lambda: save_checkpoint(out, model.cpu(), arch, list(ROTATION_CLASSES), "rotation", info)
    )
    return TrainReport(arch, list(ROTATION_CLASSES), cfg, result)
