"""Supervised training, evaluation and rotation self-supervised pretraining (docs/algorithm.md §7-8).

Both trainers keep the epoch with the best held-out accuracy (never a test set) and return its
weights. Images come from a :class:`sources.ImageSource`: decoded once into memory when they fit
(``images.fits_in_memory``), else streamed from disk by a DataLoader.

The jobs behind ``alfk train`` and ``alfk pretrain`` (checkpoints in and out) are in
:mod:`alfk_cli.train.jobs`.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from alfk_cli.data.decode import model_inputs
from alfk_cli.data.inputspec import InputSpec
from alfk_cli.data.scan import ImageSet
from alfk_cli.errors import AlfkError
from alfk_cli.models.freeze import freeze_stages
from alfk_cli.models.nets import TapNet
from alfk_cli.train import balance
from alfk_cli.train.sources import ImageSource
from alfk_cli.util import distributed
from alfk_cli.util.devices import autocast
from alfk_cli.util.progress import ProgressSink
from alfk_cli.util.reproducible import seeded


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Every value of a training run, resolved (see :func:`default_config` and
    :meth:`TrainOptions.config` for the architecture's defaults)."""

    epochs: int = 30
    lr: float = 0.05
    momentum: float = 0.5
    weight_decay: float = 0.0
    batch_size: int = 25
    seed: int = 0
    workers: int | None = None
    # learning rate ×0.1 at these fractions of the run (MNIST: every 15 of 50 epochs)
    milestones: tuple[float, ...] = (0.3, 0.6, 0.9)
    # evaluate the held-out set every this many epochs (and after the last): a cost cut
    eval_every: int = 1
    # class balancing of the labelled set: none, reweight, sample or auto (train/balance.py)
    balance: str = "none"
    # stages that do not train: none, backbone or a stage name (models/freeze.py)
    freeze: str = "none"


@dataclass
class TrainResult:
    best_epoch: int  # 1-based
    best_accuracy: float
    per_class: list[float]
    history: list[dict[str, float]] = field(default_factory=list)
    # (absolute path, reason) of images that failed to decode
    skipped: list[tuple[str, str]] = field(default_factory=list)
    balance: str = "none"  # the class balancing trained with (what ``auto`` chose)


def milestones(epochs: int, fractions: Sequence[float]) -> list[int]:
    return sorted({m for f in fractions if 0 < (m := round(epochs * f)) < epochs})


@torch.no_grad()
def predict(
    model: TapNet, source: ImageSource, device: torch.device, batch_size: int = 256
) -> torch.Tensor:
    """Logits of every image of ``source`` in row order (float32, on the CPU)."""
    model.eval().to(device)
    norm = model_inputs(source.spec)
    out = []
    for img, _ in source.batches(batch_size):
        with autocast(device):
            out.append(model(norm(img.to(device))).float().cpu())
    return torch.cat(out) if out else torch.empty(0, model.num_classes)


def accuracy(
    logits: torch.Tensor, labels: torch.Tensor, num_classes: int
) -> tuple[float, list[float]]:
    """Overall accuracy and per-class accuracy (NaN for a class with no images)."""
    hit = logits.argmax(1) == labels
    per = [
        hit[labels == c].float().mean().item() if (labels == c).any() else math.nan
        for c in range(num_classes)
    ]
    return (hit.float().mean().item() if len(hit) else math.nan), per


def fit(
    model: TapNet,
    train_src: ImageSource,
    held_src: ImageSource,
    cfg: TrainConfig,
    *,
    device: torch.device,
    progress: ProgressSink | None = None,
    description: str = "train",
    transform=None,
) -> TrainResult:
    """The training loop of every trainer: SGD with step decay; the held-out set is evaluated
    every ``cfg.eval_every`` epochs and after the last, and the best such epoch is kept (its
    weights are loaded into ``model``). ``transform`` maps (x, y) batches (rotations).

    ``cfg.balance`` balances the classes of ``train_src`` (:mod:`alfk_cli.train.balance`); ``auto``
    trains each way from the same weights and keeps the best on ``held_src``.

    ``cfg.freeze`` (:mod:`alfk_cli.models.freeze`) leaves the stages it names out of the optimiser, with
    ``requires_grad`` off, and in eval mode at every epoch (batch-norm statistics fixed).

    Dropout draws from torch's global RNG, so the loop runs under ``seeded(cfg.seed)``: the same
    seed gives the same weights whatever the caller drew before, and the caller's RNG is left as
    it was. Shuffling has its own generator, seeded alike.
    """
    if len(train_src) == 0:
        raise AlfkError("no readable training images")
    mode = balance.check_balance(cfg.balance)
    if mode != "none" and transform is not None:
        raise AlfkError("class balancing applies to classifier training, not to pretraining")
    if mode != "auto":
        return _fit_once(model, train_src, held_src, cfg, device, progress, description, transform)
    start = copy.deepcopy(model.state_dict())
    best: tuple[TrainResult, dict] | None = None
    for m in balance.TRAINED_MODES:
        model.load_state_dict(start)
        one = dataclasses.replace(cfg, balance=m)
        label = f"{description} ({m})"
        res = _fit_once(model, train_src, held_src, one, device, progress, label, None)
        if best is None or res.best_accuracy > best[0].best_accuracy:
            best = (res, copy.deepcopy(model.state_dict()))
    assert best is not None
    model.load_state_dict(best[1])
    return best[0]


def _fit_once(
    model: TapNet,
    train_src: ImageSource,
    held_src: ImageSource,
    cfg: TrainConfig,
    device: torch.device,
    progress: ProgressSink | None,
    description: str,
    transform,
) -> TrainResult:
    """:func:`fit` with one balancing mode (none, reweight or sample)."""
    weight = draw = None
    if cfg.balance == "reweight":
        weight = balance.class_weights(train_src.labels, model.num_classes)
    elif cfg.balance == "sample":
        draw = balance.sample_weights(train_src.labels, model.num_classes)
    frozen = freeze_stages(model, cfg.freeze)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise AlfkError("nothing to train: every parameter is frozen")
    with seeded(cfg.seed, device):
        model.to(device)
        opt = torch.optim.SGD(
            trainable, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
        sched = torch.optim.lr_scheduler.MultiStepLR(
            opt, milestones(cfg.epochs, cfg.milestones), gamma=0.1
        )
        gen = torch.Generator().manual_seed(cfg.seed)
        norm = model_inputs(train_src.spec)
        net = distributed.data_parallel(model, device)  # DDP under torchrun, else model
        share = math.ceil(len(train_src) / distributed.world())
        steps = math.ceil(share / cfg.batch_size)
        task = None
        if progress is not None:
            task = progress.add_task(description, total=cfg.epochs * steps, status="")
        best: tuple[float, int, dict, list[float]] = (-1.0, 0, {}, [])
        history = []
        for epoch in range(1, cfg.epochs + 1):
            model.train()
            for module in frozen:
                module.eval()
            total, n = 0.0, 0
            batches = train_src.batches(cfg.batch_size, True, gen, shard=True, weights=draw)
            for img, label in batches:
                x, y = norm(img.to(device)), label.to(device)
                if transform is not None:
                    x, y = transform(x, y)
                with autocast(device):
                    loss = balance.loss(net(x).float(), y, weight)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total, n = total + loss.item() * len(y), n + len(y)
                if progress is not None and task is not None:
                    progress.advance(task)
            sched.step()
            if epoch % max(1, cfg.eval_every) and epoch != cfg.epochs:
                continue
            acc, per = evaluate(model, held_src, device, transform)
            history.append({"epoch": epoch, "loss": total / max(n, 1), "accuracy": acc})
            if acc > best[0]:
                best = (acc, epoch, copy.deepcopy(model.state_dict()), per)
            if progress is not None and task is not None:
                loss_ = total / max(n, 1)
                status = f"loss {loss_:.3f} held-out acc {acc:.3f} (best {best[0]:.3f})"
                progress.update(task, status=status)
        model.load_state_dict(best[2])
    # a streamed source meets a bad image once per epoch: list it once
    failed = list(dict.fromkeys(train_src.bad + held_src.bad))
    return TrainResult(best[1], best[0], best[3], history, failed, cfg.balance)


def evaluate(
    model: TapNet, source: ImageSource, device: torch.device, transform=None
) -> tuple[float, list[float]]:
    """Accuracy on ``source``; ``transform`` maps (x, y) batches as in training (rotations)."""
    model.eval()
    norm = model_inputs(source.spec)
    logits, labels = [], []
    with torch.no_grad():
        for img, label in source.batches(256):
            x, y = norm(img.to(device)), label.to(device)
            if transform is not None:
                x, y = transform(x, y)
            with autocast(device):
                logits.append(model(x).float().cpu())
            labels.append(y.cpu())
    if not logits:
        raise AlfkError("no readable held-out images")
    return accuracy(torch.cat(logits), torch.cat(labels), model.num_classes)


def train_classifier(
    model: TapNet,
    data: ImageSet,
    val: ImageSet,
    spec: InputSpec,
    cfg: TrainConfig,
    device: torch.device,
    *,
    progress: ProgressSink | None = None,
) -> TrainResult:
    """Supervised training on ``data``; the epoch with the best accuracy on ``val`` is kept."""
    return fit(
        model,
        ImageSource(data, spec, workers=cfg.workers),
        ImageSource(val, spec, workers=cfg.workers),
        cfg,
        device=device,
        progress=progress,
        description="train",
    )


def rotate_batch(
    x: torch.Tensor, _y: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """B images -> 4B: each at 0°, 90°, 180° and 270°, labelled by rotation index (RotNet)."""
    xs = torch.cat([torch.rot90(x, k, dims=(2, 3)) for k in range(4)])
    ys = torch.arange(4, device=x.device).repeat_interleave(len(x))
    return xs, ys


def split_holdout(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of ``range(n)`` into (train rows, held-out rows); at least one of each when n ≥ 2."""
    perm = np.random.default_rng(seed).permutation(n)
    k = min(max(1, round(n * fraction)), n - 1) if n >= 2 else 0
    return np.sort(perm[k:]), np.sort(perm[:k])


def pretrain_rotation(
    model: TapNet,
    images: ImageSet,
    spec: InputSpec,
    cfg: TrainConfig,
    device: torch.device,
    *,
    holdout: float = 0.1,
    progress: ProgressSink | None = None,
) -> TrainResult:
    """Rotation self-supervision on any folder (labels ignored); ``model`` has a 4-way head.

    Reports rotation accuracy on a held-out slice of the images and keeps the best epoch there.
    """
    if model.num_classes != 4:
        raise AlfkError("rotation pretraining needs a model with a 4-way head")
    if len(images) < 2:
        raise AlfkError(
            f"rotation pretraining needs at least 2 images, {images.root} has {len(images)}"
        )
    train_rows, held_rows = split_holdout(len(images), holdout, cfg.seed)
    train_src = ImageSource(images, spec, train_rows, cfg.workers)
    held_src = ImageSource(images, spec, held_rows, cfg.workers)
    return fit(
        model,
        train_src,
        held_src,
        cfg,
        device=device,
        progress=progress,
        description="pretrain",
        transform=rotate_batch,
    )


ROTNET_MILESTONES = (3 / 8, 6 / 8)  # ×0.1 at epochs 3 and 6 of 8 (RotNet on MNIST)


def default_config(
    arch: str,
    *,
    epochs: int,
    lr: float | None = None,
    momentum: float | None = None,
    weight_decay: float | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    workers: int | None = None,
    milestones: tuple[float, ...] | None = None,
    eval_every: int = 1,
    balance: str = "none",
    freeze: str = "none",
) -> TrainConfig:
    """A TrainConfig with the architecture's defaults for every value left as None."""
    from alfk_cli.models.archs import get_arch

    d = get_arch(arch).train_defaults
    return TrainConfig(
        epochs=epochs,
        lr=d["lr"] if lr is None else lr,
        momentum=d["momentum"] if momentum is None else momentum,
        weight_decay=d["weight_decay"] if weight_decay is None else weight_decay,
        batch_size=int(d["batch_size"]) if batch_size is None else batch_size,
        seed=seed,
        workers=workers,
        eval_every=eval_every,
        balance=balance,
        freeze=freeze,
        **({} if milestones is None else {"milestones": milestones}),
    )
