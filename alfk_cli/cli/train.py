"""``alfk train`` and ``alfk pretrain``: options in, ``training`` library calls, tables out."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from alfk_cli.cli.app import app
from alfk_cli.cli.console import stderr
from alfk_cli.cli.options import (
    Arch,
    Balance,
    Device,
    Freeze,
    Quiet,
    Seed,
    Strict,
    Workers,
    accuracy_table,
    check_freeze,
    outputs_ok,
    report_skipped,
    say,
    say_note,
)


def _say_training(quiet: bool, init: Path | None, head: str, start) -> None:
    """What ``train`` says before its first epoch; ``start`` is a ``train.jobs.TrainStart``."""
    if init is not None:
        fresh = ", ".join(start.fresh) or "nothing"
        named = {"imagenet": "torchvision ImageNet weights", "backbone": "a weights file"}
        what = named.get(head, f"{head} checkpoint")
        say(quiet, f"initialised from {init} ({what}); fresh: {fresh}")
    say(
        quiet,
        f"training {start.arch} on {start.train_images} images ({len(start.classes)} classes), "
        f"validating on {start.val_images}, device {start.device}",
    )


def _load_start(init: Path | None, arch: str | None):
    """What ``--init`` names (``backbones.load_start``), read before any work; None without."""
    from alfk_cli.models.archs import AUTO
    from alfk_cli.models.backbones import load_start

    return load_start(init, None if arch == AUTO else arch) if init else None


def _choose_arch(arch: str | None, start, images, quiet: bool) -> tuple[str, str | None]:
    """The architecture to build and why, when ``auto`` chose it (``models.archauto.auto_reason``):
    ``--arch``, else the ``--init`` checkpoint's (``start``), else one chosen from ``images``; a
    note says which and why, a warning when an explicit one does not fit the images."""
    from alfk_cli.models.archauto import auto_reason, pick_arch
    from alfk_cli.models.archs import AUTO

    if start is not None:
        return (start.arch if arch in (None, AUTO) else arch), None
    chosen, said = pick_arch(arch, images)
    if said:
        say_note(quiet, said)
    return chosen, auto_reason(arch, said)


TRAIN_INIT_HELP = (
    "Start from this checkpoint (pretrained or a previous model), a torchvision resnet18 "
    "state-dict file, torchvision:resnet18 (ImageNet weights), or with --arch timm:NAME a "
    "weights file of that model."
)


@app.command(epilog="Example: alfk train --data labeled/ --val val/ --init init.pt --out model.pt")
def train(
    data: Annotated[
        Path, typer.Option("--data", "-d", help="Labelled images, one sub-folder per class.")
    ],
    val: Annotated[
        Path,
        typer.Option(
            "--val", "-v", help="Validation images (same class folders); picks the best epoch."
        ),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Checkpoint to write.")],
    init: Annotated[Path | None, typer.Option("--init", help=TRAIN_INIT_HELP)] = None,
    arch: Arch = None,
    epochs: Annotated[int, typer.Option("--epochs", min=1)] = 30,
    lr: Annotated[
        float | None, typer.Option("--lr", help="Learning rate (default: per architecture).")
    ] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", "-b", min=1)] = None,
    momentum: Annotated[float | None, typer.Option("--momentum")] = None,
    weight_decay: Annotated[float | None, typer.Option("--weight-decay")] = None,
    seed: Seed = 0,
    balance: Balance = "none",
    freeze: Freeze = "none",
    device: Device = "auto",
    workers: Workers = None,
    strict: Strict = False,
    quiet: Quiet = False,
) -> None:
    """Train the task model on labelled images; keep the epoch with the best validation accuracy."""
    from alfk_cli.cli.console import make_progress
    from alfk_cli.data.scan import scan_images
    from alfk_cli.models.archs import AUTO
    from alfk_cli.train.jobs import TrainOptions, train_checkpoint
    from alfk_cli.util.devices import resolve_device

    outputs_ok(out, data, val)  # --init may be --out: it is read first, the output is atomic
    dev = resolve_device(device)
    start = _load_start(init, arch)
    known = start.arch if start else (None if arch in (None, AUTO) else arch)
    if freeze != "none" and known:  # a usage error before any work
        say(quiet, f"frozen (not trained): {', '.join(check_freeze(known, freeze))}")
    # decode failures are listed when the images are decoded; --strict checks them first
    data_set = scan_images(data, strict=strict, verify=strict)
    val_set = scan_images(val, strict=strict, verify=strict)
    for found, folder in ((data_set, data), (val_set, val)):
        report_skipped(found.skipped, folder, quiet)
    chosen, why = _choose_arch(arch, start, data_set, quiet)
    if freeze != "none" and not known:  # --arch auto: a usage error once it has chosen
        say(quiet, f"frozen (not trained): {', '.join(check_freeze(chosen, freeze))}")
    options = TrainOptions(
        arch=chosen, arch_auto=why, epochs=epochs, lr=lr, momentum=momentum,
        weight_decay=weight_decay, batch_size=batch_size, seed=seed, workers=workers,
        balance=balance, freeze=freeze,
    )  # fmt: skip
    with make_progress(quiet) as progress:
        report = train_checkpoint(
            data_set,
            val_set,
            out,
            options,
            device=dev,
            init=start,
            progress=progress,
            on_start=lambda s: _say_training(quiet, init, start.head if start else "", s),
        )
    result = report.result
    report_skipped(result.skipped, data, quiet)
    if not quiet:
        title = f"validation accuracy, epoch {result.best_epoch} of {report.config.epochs}"
        if balance != "none":
            title += f", balance {result.balance}"
        if freeze != "none":
            title += f", frozen: {freeze}"
        stderr.print(accuracy_table(title, val_set.classes, result.best_accuracy, result.per_class))
    say(quiet, f"wrote {out}")


@app.command(epilog="Example: alfk pretrain --images unlabeled/ --out init.pt")
def pretrain(
    images: Annotated[
        Path, typer.Option("--images", "-i", help="Any image folder; labels are ignored.")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Checkpoint to write.")],
    arch: Arch = "auto",
    init: Annotated[
        Path | None,
        typer.Option(
            "--init",
            help="Start from these weights: an alfk checkpoint, a torchvision resnet18 "
            "state-dict file, or with --arch timm:NAME a weights file of that model (the "
            "rotation head is always fresh).",
        ),
    ] = None,
    epochs: Annotated[int, typer.Option("--epochs", min=1)] = 8,
    lr: Annotated[
        float | None, typer.Option("--lr", help="Learning rate (default: per architecture).")
    ] = None,
    batch_size: Annotated[
        int | None,
        typer.Option("--batch-size", "-b", min=1, help="Images per batch (×4 rotations)."),
    ] = None,
    momentum: Annotated[float | None, typer.Option("--momentum")] = None,
    weight_decay: Annotated[float | None, typer.Option("--weight-decay")] = None,
    holdout: Annotated[
        float,
        typer.Option(
            "--holdout", min=0.01, max=0.5, help="Fraction held out to measure rotation accuracy."
        ),
    ] = 0.1,
    seed: Seed = 0,
    device: Device = "auto",
    workers: Workers = None,
    strict: Strict = False,
    quiet: Quiet = False,
) -> None:
    """Rotation self-supervised pretraining (RotNet) of the task network on unlabelled images."""
    from alfk_cli.cli.console import make_progress
    from alfk_cli.data.scan import scan_images
    from alfk_cli.train.jobs import TrainOptions, pretrain_checkpoint
    from alfk_cli.util.devices import resolve_device

    outputs_ok(out, images)  # --init may be --out: it is read first, the output is atomic
    dev = resolve_device(device)
    start = _load_start(init, arch)
    found = scan_images(images, strict=strict, verify=strict)
    report_skipped(found.skipped, images, quiet)
    arch, why = _choose_arch(arch, start, found, quiet)
    if start is not None:
        say(quiet, f"initialised from {init} ({start.head} weights); the rotation head is fresh")
    options = TrainOptions(
        arch=arch,
        arch_auto=why,
        epochs=epochs,
        lr=lr,
        momentum=momentum,
        weight_decay=weight_decay,
        batch_size=batch_size,
        seed=seed,
        workers=workers,
    )
    say(quiet, f"rotation pretraining {arch} on {len(found)} images, device {dev}")
    with make_progress(quiet) as progress:
        report = pretrain_checkpoint(
            found, out, options, device=dev, holdout=holdout, progress=progress, init=start
        )
    result = report.result
    report_skipped(result.skipped, images, quiet)
    if not quiet:
        title = f"held-out rotation accuracy, epoch {result.best_epoch} of {report.config.epochs}"
        labels = [f"{c}°" for c in report.classes]
        stderr.print(accuracy_table(title, labels, result.best_accuracy, result.per_class))
    say(quiet, f"wrote {out}")
