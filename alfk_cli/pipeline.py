"""The nightly ``select`` orchestrator: every stage that is out of date, in the work folder.

``run_select`` is ``alfk select --val DIR --pool DIR``: it
pretrains (only when no checkpoint is given or found), embeds the validation set and the pool into
the work folder, scores and returns the selection, reusing every cached stage whose inputs are
unchanged (a pool that gained images embeds only the new ones).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from alfk_cli import distributed, ledger
from alfk_cli.embedding import EmbedOptions, EmbedSummary, embed_folder, trusted_files
from alfk_cli.errors import AlfkError
from alfk_cli.imagescan import ImageSet, scan_images
from alfk_cli.montecarlo import MCConfig
from alfk_cli.poollist import scan_pool
from alfk_cli.reporting import ProgressSink
from alfk_cli.scores import Scores
from alfk_cli.scoring import ScoreOptions, score_stores
from alfk_cli.search import backend_choice
from alfk_cli.strategies import make_strategy
from alfk_cli.workdir import default_workdir, locked, newest_checkpoint

__all__ = ["ScoreOptions", "SelectOptions", "SelectReport", "run_select", "score_stores"]


@dataclass
class SelectReport:
    """What the orchestrator did, for the summary on stderr."""

    workdir: Path
    checkpoint: Path
    pretrained: bool
    embeds: list[EmbedSummary] = field(default_factory=list)
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True, kw_only=True)
class SelectOptions:
    """The nightly selection's options (``alfk select --val DIR --pool DIR``).

    ``model``: the task checkpoint (default: the newest in the work folder, else one is
    rotation-pretrained with ``arch`` for ``pretrain_epochs``). ``workdir``: the cache folder
    (default ``.alfk/<pool name>`` beside the pool). The rest as in :class:`ScoreOptions` and the
    embed stage.
    """

    P: int
    model: str | os.PathLike | None = None
    arch: str = "lenet"
    workdir: str | os.PathLike | None = None
    exclude: str | os.PathLike | None = None
    strategy: str = "fk"
    kernel: str = "sum"
    pseudo_label: str | None = None
    taps: str | None = None
    seed: int = 0
    device: str = "auto"
    workers: int | None = None  # None: the cores available (images.loader_workers)
    strict: bool = False
    pretrain_epochs: int = 8
    exact_count: bool = False
    mc_samples: int = 32
    pool_list: str | os.PathLike | None = None  # the pool's images named in a file (poollist)
    ledger: bool = True  # record the selection in the ledger (earlier sends are always left out)


def run_select(
    val_dir: str | os.PathLike,
    pool_dir: str | os.PathLike,
    options: SelectOptions,
    *,
    progress: ProgressSink | None = None,
    deliver: Callable[[Scores, Path], None] | None = None,
) -> tuple[Scores, list[str], SelectReport]:
    """The nightly acquisition: P pool image paths in selection order, plus notes and a report.

    The selection is recorded in the ledger (unless ``options.ledger`` is off) only once it is
    delivered: after ``deliver(scores, val_store)`` returns, still under the work folder's lock,
    so that a run whose output was lost records nothing and the next run picks the same images."""
    t0 = time.perf_counter()
    P = options.P
    if P < 1:
        raise AlfkError(f"P must be at least 1, not {P}")
    strategy = make_strategy(
        options.strategy, {"estimator": options.pseudo_label, "kernel": options.kernel}
    )
    backend_choice()  # a bad ALFK_SEARCH_BACKEND fails before any model pass
    # Printed paths start with the pool folder as typed, normalised (``unlabeled``, ``unlabeled/``
    # and ``./unlabeled`` print alike); exclusions match by identity whatever the spelling.
    pool_arg = os.path.normpath(str(pool_dir))
    wd = Path(options.workdir) if options.workdir is not None else default_workdir(pool_dir)
    val_scan, pool_scan = _scan(val_dir, pool_dir, wd, options)
    # under torchrun rank 0 holds the lock for all ranks; every rank runs every stage
    with locked(wd) if distributed.is_main() else contextlib.nullcontext():
        report = SelectReport(wd, Path(), False)
        ckpt = Path(options.model) if options.model is not None else newest_checkpoint(wd)
        if ckpt is None:
            ckpt = wd / "init.pt"
            _pretrain(pool_scan, ckpt, options, progress)
            report.pretrained = True
        report.checkpoint = ckpt
        embed = EmbedOptions(
            taps=options.taps,
            workers=options.workers,
            device=options.device,
            seed=options.seed,
            strict=options.strict,
            mc=MCConfig(samples=options.mc_samples),
        )
        val_store, pool_store = wd / "val.h5", wd / "pool.h5"
        report.embeds.append(
            embed_folder(
                ckpt, val_dir, val_store, embed, reuse=val_store, images=val_scan, progress=progress
            )
        )
        pseudo_label = strategy.estimator or options.pseudo_label
        report.embeds.append(
            embed_folder(
                ckpt,
                pool_dir,
                pool_store,
                embed,
                reference=val_store,
                pseudo_label=pseudo_label,
                reuse=pool_store,
                images=pool_scan,
                progress=progress,
            )
        )
        score = _score_options(options, pool_arg, ckpt)
        scores, notes = _score(val_store, pool_store, wd, score, options)
        if deliver is not None:  # an error here (stdout gone, a full disk) records nothing
            deliver(scores, val_store)
        if options.ledger and len(scores.selected):
            notes.append(_record(wd, scores, options, pool_arg))
    report.seconds = time.perf_counter() - t0
    return scores, notes, report


def _score_options(options: SelectOptions, pool_arg: str, ckpt: Path) -> ScoreOptions:
    return ScoreOptions(
        P=options.P,
        strategy=options.strategy,
        kernel=options.kernel,
        exclude=options.exclude,
        seed=options.seed,
        device=options.device,
        image_root=pool_arg,
        reuse=True,
        exact_count=options.exact_count,
        checkpoint=ckpt,
        mc_samples=options.mc_samples,
        workers=options.workers,
    )


def _score(
    val_store: Path, pool_store: Path, wd: Path, score: ScoreOptions, options: SelectOptions
) -> tuple[Scores, list[str]]:
    """Score, leaving out every image the ledger says was sent (read only; ``--no-ledger`` too).

    There is no replay: a second run with nothing changed picks the next P images. Looking again
    at a delivered run is ``alfk history --run N`` (or ``--run last``)."""
    has_ledger = (wd / ledger.FILE_NAME).is_file()
    notes: list[str] = []
    if not has_ledger and options.ledger and (wd / "scores.h5").is_file():
        notes.append(
            f"warning: {wd} has stores and scores but no {ledger.FILE_NAME}: earlier sends are "
            "unknown, so every image may be sent again"
        )
    if options.ledger and not has_ledger:
        distributed.on_main(lambda: ledger.create(wd))  # a failed first night is not a deletion
    sent = frozenset(ledger.sent_paths(wd)) if has_ledger else frozenset()
    scores, more = score_stores(val_store, pool_store, wd / "scores.h5", replace(score, sent=sent))
    return scores, [*notes, *more]


def _record(wd: Path, scores: Scores, options: SelectOptions, pool_arg: str) -> str:
    """Record a delivered selection in the ledger; the note that says so."""
    settings = {k: str(v) if isinstance(v, os.PathLike) else v for k, v in asdict(options).items()}
    run_id = distributed.on_main(
        lambda: ledger.record(
            wd, scores, pool=pool_arg, strategy=options.strategy, options=settings, P=options.P
        )
    )
    return f"recorded as run {run_id} in {wd / ledger.FILE_NAME}"


def _scan(
    val_dir: str | os.PathLike, pool_dir: str | os.PathLike, wd: Path, options: SelectOptions
) -> tuple[ImageSet, ImageSet]:
    """Fail fast, before any model pass, on what can be checked from the folders alone.

    Each folder is walked once and its files stat'ed, not opened: an image that fails to decode is
    skipped and listed when it is embedded (``--strict``: verified here first, except files
    unchanged since the cached stores)."""
    strict = options.strict
    if options.pool_list is not None:
        trusted = trusted_files(wd / "pool.h5")  # paths in the store: not stat'ed
        pool_scan = scan_pool(pool_dir, options.pool_list, strict=strict, trusted=trusted)
    else:  # the stored files only spare --strict's verification
        trusted = trusted_files(wd / "pool.h5") if strict else {}
        pool_scan = scan_images(pool_dir, strict=strict, verify=strict, trusted=trusted)
    if options.P > len(pool_scan):
        raise AlfkError(f"P={options.P} is more than the {len(pool_scan)} images in {pool_dir}")
    trusted = trusted_files(wd / "val.h5") if strict else {}
    val_scan = scan_images(val_dir, strict=strict, verify=strict, trusted=trusted)
    if not val_scan.labelled:
        raise AlfkError(f"{val_dir} has no class sub-folders; the validation set must be labelled")
    try:
        wd.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise AlfkError(f"cannot create work folder {wd}: {exc.strerror}") from None
    return val_scan, pool_scan


def _pretrain(
    images: ImageSet, out: Path, options: SelectOptions, progress: ProgressSink | None
) -> None:
    from alfk_cli.devices import resolve_device
    from alfk_cli.training_jobs import TrainOptions, pretrain_checkpoint

    train = TrainOptions(
        arch=options.arch,
        epochs=options.pretrain_epochs,
        seed=options.seed,
        workers=options.workers,
    )
    pretrain_checkpoint(
        images, out, train, device=resolve_device(options.device), progress=progress
    )
