"""Stages composed: score two feature stores, and the nightly ``select`` orchestrator.

``score_stores`` is ``alfk score``; ``run_select`` is ``alfk select --val DIR --pool DIR``: it
pretrains (only when no checkpoint is given or found), embeds the validation set and the pool into
the work folder, scores and returns the selection, reusing every cached stage whose inputs are
unchanged (a pool that gained images embeds only the new ones).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rich.progress import Progress

from alfk_cli import acquisition
from alfk_cli.atomic import check_writable_dir
from alfk_cli.embedding import EmbedSummary, embed_folder, trusted_files
from alfk_cli.errors import AlfkError
from alfk_cli.images import ImageSet, scan_images
from alfk_cli.scores import Scores, read_scores, write_scores
from alfk_cli.store import FeatureStore, check_compatible, open_store
from alfk_cli.workdir import default_workdir, locked, match_exclusions, newest_checkpoint


@dataclass
class SelectReport:
    """What the orchestrator did, for the summary on stderr."""

    workdir: Path
    checkpoint: Path
    pretrained: bool
    embeds: list[EmbedSummary] = field(default_factory=list)
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


def _same_files(pool_paths: list[str], pool_root: str, val: FeatureStore) -> np.ndarray:
    """Pool rows that are validation images: the validation folder lies inside the pool folder
    (e.g. ``--pool data/ --val data/val``), so the same file is reachable through both."""
    pool_abs, val_abs = Path(pool_root).resolve(), Path(val.image_root).resolve()
    try:
        prefix = val_abs.relative_to(pool_abs).as_posix()
    except ValueError:  # the folders are disjoint, or the pool lies inside the validation folder
        prefix = None
    if prefix is None:
        inside = pool_abs.is_relative_to(val_abs)
        sub = pool_abs.relative_to(val_abs).as_posix() + "/" if inside else None
        val_set = set(val.paths)
        rows = [i for i, p in enumerate(pool_paths) if sub is not None and sub + p in val_set]
    else:
        val_set = {f"{prefix}/{p}" if prefix != "." else p for p in val.paths}
        rows = [i for i, p in enumerate(pool_paths) if p in val_set]
    return np.array(rows, dtype=np.int64)


def score_stores(
    val_path: str | os.PathLike,
    pool_path: str | os.PathLike,
    P: int,
    out: str | os.PathLike,
    kernel: str = "sum",
    exclude: str | os.PathLike | None = None,
    seed: int = 0,
    device: str = "cpu",
    image_root: str | None = None,
    reuse: bool = False,
    exact_count: bool = False,
) -> tuple[Scores, list[str]]:
    """Select P pool images against the validation store and write the scores file ``out``.

    ``exclude`` names a file of image paths (already labelled or already sent) removed before the
    search; validation images found in the pool are always removed. ``image_root`` overrides the
    pool folder used to print paths (default: the one recorded in the pool store). ``reuse``
    returns an existing ``out`` made from the same stores and options instead of recomputing.
    When fewer than P images are left after the exclusions (the end of a pool), the ones left are
    selected and a note starting with ``warning:`` says so; ``exact_count`` makes it an error.
    Returns the scores and notes for the user (e.g. the no-misclassified fallback).
    """
    check_writable_dir(out)
    notes: list[str] = []
    with open_store(val_path) as val, open_store(pool_path) as pool:
        check_compatible(val, pool)
        root = image_root if image_root is not None else pool.image_root
        if (np.asarray(val.labels[:]) < 0).any():
            raise AlfkError(
                f"{val.path} has images without labels; the validation store needs class sub-folders"
            )
        pool_paths = pool.paths
        drop = set(_same_files(pool_paths, root, val).tolist())
        if drop:
            notes.append(f"left out {len(drop)} pool image(s) that are also validation images")
        if exclude is not None:
            found = match_exclusions(exclude, root, pool_paths)
            unmatched = (
                f"; {found.unmatched} line(s) named no image of this pool"
                if found.unmatched
                else ""
            )
            notes.append(f"excluded {len(found.rows)} pool image(s) listed in {exclude}{unmatched}")
            drop.update(found.rows)
        # Everything the selection depends on (the rows left out, not how the lists spelled
        # them); an existing scores file with the same key is reused, its notes repeated.
        key = json.dumps(
            {
                "val": val.get_attr("fingerprint"),
                "pool": pool.get_attr("fingerprint"),
                "P": P,
                "kernel": kernel,
                "seed": seed,
                "image_root": root,
                "val_root": val.image_root,
                "left_out": hashlib.sha256(
                    np.array(sorted(drop), dtype=np.int64).tobytes()
                ).hexdigest(),
                "exact_count": exact_count,
            },
            sort_keys=True,
        )
        if reuse and Path(out).is_file():
            with contextlib.suppress(AlfkError, ValueError):
                cached = read_scores(out)
                if cached.attrs.get("cache_key") == key:
                    return cached, [
                        *json.loads(cached.attrs.get("notes", "[]")),
                        f"{out} is up to date",
                    ]
        left = len(pool_paths) - len(drop)
        if left < P:
            if exact_count:
                raise AlfkError(
                    f"only {left} pool image(s) are left to select, fewer than --P {P} "
                    "(without --exact-count the ones left are selected)"
                )
            notes.append(
                f"warning: only {left} pool image(s) are left to select; selecting {left}, not {P}"
            )
        if left == 0:
            sel = _empty_selection(kernel)
        else:
            sel = acquisition.select(
                val,
                pool,
                min(P, left),
                kernel=kernel,
                exclude=np.array(sorted(drop), dtype=np.int64) if drop else None,
                seed=seed,
                device=device,
            )
        if sel.fallback:
            notes.append(
                "no validation image is misclassified: the whole validation set served as centres"
            )
        classes = val.classes
        rows = np.asarray(sel.selected)
        order = np.argsort(rows)
        logits = np.empty((len(rows), len(classes)), dtype=np.float32)
        logits[order] = pool.logits[rows[order]] if len(rows) else logits[:0]
        predicted = [classes[c] for c in logits.argmax(1)]
        val_paths = val.paths
        center_paths = [os.path.join(val.image_root, val_paths[c]) for c in sel.center]
        attrs = {
            "val_store": str(val_path),
            "pool_store": str(pool_path),
            "val_store_fingerprint": val.get_attr("fingerprint"),
            "pool_store_fingerprint": pool.get_attr("fingerprint"),
            "cache_key": key,
            "notes": json.dumps(notes),
            "checkpoint_sha256": pool.checkpoint_sha256,
            "seed": seed,
            "excluded": len(drop),
            "misclassified": len(acquisition.misclassified(val.logits[:], val.labels[:])),
        }
        write_scores(out, sel, [pool_paths[r] for r in rows], predicted, center_paths, root, attrs)
    return read_scores(out), notes


def _empty_selection(kernel: str) -> acquisition.Selection:
    """The selection when every pool image is excluded: nothing to label tonight."""
    none = np.empty(0, dtype=np.int64)
    return acquisition.Selection(none, np.empty(0, dtype=np.float32), none, none, False, kernel, 0)


def run_select(
    val_dir: str | os.PathLike,
    pool_dir: str | os.PathLike,
    P: int,
    model: str | os.PathLike | None = None,
    arch: str = "lenet",
    workdir: str | os.PathLike | None = None,
    exclude: str | os.PathLike | None = None,
    kernel: str = "sum",
    pseudo_label: str | None = None,
    taps: str | None = None,
    seed: int = 0,
    device: str = "auto",
    workers: int = 2,
    strict: bool = False,
    quiet: bool = False,
    progress: Progress | None = None,
    pretrain_epochs: int = 8,
    exact_count: bool = False,
) -> tuple[Scores, list[str], SelectReport]:
    """The nightly acquisition: P pool image paths in selection order, plus notes and a report."""
    t0 = time.perf_counter()
    if P < 1:
        raise AlfkError("--P must be at least 1")
    # Printed paths start with the pool folder as typed, normalised (``unlabeled``, ``unlabeled/``
    # and ``./unlabeled`` print alike); exclusions match by identity whatever the spelling.
    pool_arg = os.path.normpath(str(pool_dir))
    wd = Path(workdir) if workdir is not None else default_workdir(pool_dir)
    # Fail fast, before any model pass, on what can be checked from the folders alone.
    # Each folder is walked once; files unchanged since the cached stores are not re-verified.
    val_store, pool_store = wd / "val.h5", wd / "pool.h5"
    pool_scan = scan_images(pool_dir, strict=strict, trusted=trusted_files(pool_store))
    if P > len(pool_scan):
        raise AlfkError(f"P={P} is more than the {len(pool_scan)} images in {pool_dir}")
    val_scan = scan_images(val_dir, strict=strict, trusted=trusted_files(val_store))
    if not val_scan.labelled:
        raise AlfkError(f"{val_dir} has no class sub-folders; the validation set must be labelled")
    try:
        wd.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise AlfkError(f"cannot create work folder {wd}: {exc.strerror}") from None
    with locked(wd):
        report = SelectReport(wd, Path(), False)
        ckpt = Path(model) if model is not None else newest_checkpoint(wd)
        if ckpt is None:
            ckpt = wd / "init.pt"
            _pretrain(pool_scan, ckpt, arch, pretrain_epochs, seed, device, workers, progress)
            report.pretrained = True
        report.checkpoint = ckpt
        common = dict(
            taps=taps,
            workers=workers,
            device=device,
            seed=seed,
            strict=strict,
            quiet=quiet,
            progress=progress,
        )
        report.embeds.append(
            embed_folder(ckpt, val_dir, val_store, reuse=val_store, images=val_scan, **common)
        )
        report.embeds.append(
            embed_folder(
                ckpt,
                pool_dir,
                pool_store,
                reference=val_store,
                pseudo_label=pseudo_label,
                reuse=pool_store,
                images=pool_scan,
                **common,
            )
        )
        scores, notes = score_stores(
            val_store,
            pool_store,
            P,
            wd / "scores.h5",
            kernel=kernel,
            exclude=exclude,
            seed=seed,
            device=device,
            image_root=pool_arg,
            reuse=True,
            exact_count=exact_count,
        )
    report.seconds = time.perf_counter() - t0
    return scores, notes, report


def _pretrain(
    images: ImageSet,
    out: Path,
    arch: str,
    epochs: int,
    seed: int,
    device: str,
    workers: int,
    progress: Progress | None,
) -> None:
    from alfk_cli.devices import resolve_device
    from alfk_cli.training import TrainOptions, pretrain_checkpoint

    options = TrainOptions(arch=arch, epochs=epochs, seed=seed, workers=workers)
    pretrain_checkpoint(images, out, options, device=resolve_device(device), progress=progress)
