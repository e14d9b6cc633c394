"""Planning an embed: everything decided before the first model pass (``plan_embed``).

Which labels g is computed with (docs/algorithm.md §2-3):

- a labelled folder (class sub-folders) without a reference is a **validation set**: g uses the
  true labels, ``pseudo_label`` is ``true`` and the classes are the folder's;
- anything else is a **pool**: g uses the estimator (default ``p_yz``, which needs a reference:
  a validation store made from the same checkpoint and taps). ``true`` needs class sub-folders;
  ``yhat`` and the MC estimators without a reference use the task checkpoint's classes (a
  rotation checkpoint has no task classifier and is refused). A pool with class sub-folders
  (simulation) keeps its true labels in ``labels``, mapped to the classes of the reference (or
  checkpoint), while g uses the estimator; images under first-level sub-folders that are not
  class names (``day1/``, ``day2/``) are unlabelled (−1).

Planning writes nothing: a bad checkpoint, an unwritable output folder, a mismatched reference
or an empty folder raise AlfkError before any file is created.

Planning imports no torch: the checkpoint's metadata and hash are read from its bytes
(``checkpoint.read_checkpoint``), so deciding that a store is up to date (its fingerprint)
needs no model. The model, its device, p_yz's reference index and the store header (whose scale
widths are read off a built network) are made on first use, by the writer, from the same
checkpoint bytes the fingerprint was computed from.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from alfk_cli import __version__
from alfk_cli.data.inputspec import InputSpec
from alfk_cli.data.poollist import scan_pool
from alfk_cli.data.scan import ImageSet, scan_images
from alfk_cli.embed.options import EmbedOptions
from alfk_cli.embed.reuse import trusted_files
from alfk_cli.errors import AlfkError
from alfk_cli.features.estimators import DEFAULT_ESTIMATOR, get_estimator
from alfk_cli.models.archs import resolve_taps, scale_dims
from alfk_cli.models.checkpoint import CheckpointFile, check_classes, read_checkpoint, task_model
from alfk_cli.store.format import SCHEMA_VERSION, config_fingerprint, content_fingerprint
from alfk_cli.store.reader import FeatureStore, open_store
from alfk_cli.store.writer import StoreHeader
from alfk_cli.util.atomic import check_writable_dir
from alfk_cli.util.devices import parse_device

if TYPE_CHECKING:
    import torch

    from alfk_cli.features.pseudolabels import NearestReference
    from alfk_cli.models.nets import TapNet


@dataclass(kw_only=True)
class EmbedPlan:
    """What ``plan_embed`` decided: the images and their labels, the checkpoint, the store's
    configuration and its fingerprints. ``options`` are resolved: ``taps`` the tap names,
    ``pseudo_label`` the method. ``model``, ``device``, ``labeler`` and ``header`` are made on
    first use (they import torch)."""

    out: Path
    folder: str | os.PathLike  # the image folder as the caller gave it (for messages)
    options: EmbedOptions
    images: ImageSet
    labels: np.ndarray  # per image: index into ``classes``, −1 unknown
    sizes: np.ndarray  # per image: file size and mtime, as scanned
    mtimes: np.ndarray
    classes: list[str]
    class_source: str  # where the classes come from, for messages
    not_classes: list[str]  # first-level sub-folders that are not class names
    checkpoint: CheckpointFile
    reference: str | os.PathLike | None
    # the reference's z, labels and scale widths, when the estimator reads them (p_yz)
    reference_data: tuple[np.ndarray, np.ndarray, list[int]] | None
    config: dict  # what determines the store's contents (its ``embed_config``)
    config_fingerprint: str
    fingerprint: str

    @property
    def method(self) -> str:
        return str(self.options.pseudo_label)

    @property
    def taps(self) -> tuple[str, ...]:
        return tuple(self.options.taps or ())

    @property
    def batch_size(self) -> int:
        return self.options.batch_for(self.checkpoint.arch)

    @property
    def spec(self) -> InputSpec:
        return self.checkpoint.input

    @cached_property
    def device(self) -> torch.device:
        from alfk_cli.util.devices import resolve_device

        return resolve_device(self.options.device)

    @property
    def device_name(self) -> str:
        """The device as resolved, when it was; else as asked (``auto``: nothing ran on it)."""
        if "device" in self.__dict__:
            return str(self.__dict__["device"])
        return parse_device(self.options.device)

    @cached_property
    def model(self) -> TapNet:
        """The task model for ``classes``, on ``device``, from the planned checkpoint's bytes."""
        return task_model(self.checkpoint.load(), self.classes, self.options.seed).to(self.device)

    @cached_property
    def labeler(self) -> NearestReference | None:
        """p_yz's nearest reference images (None for the other estimators)."""
        if self.reference_data is None:
            return None
        from alfk_cli.features.pseudolabels import NearestReference

        return NearestReference(*self.reference_data)

    @cached_property
    def header(self) -> StoreHeader:
        return StoreHeader(
            image_root=str(Path(self.folder)),
            arch=self.checkpoint.arch,
            checkpoint_sha256=self.checkpoint.sha256,
            pseudo_label=self.method,
            taps=self.taps,
            scale_dims=scale_dims(self.checkpoint.arch, self.taps),
            classes=self.classes,
            paths=self.images.paths,
            labels=self.labels,
            sizes=self.sizes,
            mtime_ns=self.mtimes,
            extra_attrs={
                "seed": np.int64(self.options.seed),
                "embed_config": json.dumps(self.config, sort_keys=True),
                "config_fingerprint": self.config_fingerprint,
                "reference_path": str(self.reference) if self.reference is not None else "",
            },
        )

    def notes(self) -> list[str]:
        """What the caller should be told about the plan (sub-folders that are not classes)."""
        nc = self.not_classes
        if not nc or len(nc) >= len(self.images.classes):
            return []
        return [
            f"sub-folders of {self.folder} that are not classes of {self.class_source}: "
            f"{', '.join(nc[:5])}{' …' if len(nc) > 5 else ''}; their images are unlabelled"
        ]


def plan_embed(
    checkpoint: str | os.PathLike,
    folder: str | os.PathLike,
    out: str | os.PathLike,
    options: EmbedOptions,
    *,
    reference: str | os.PathLike | None = None,
    reuse: str | os.PathLike | None = None,
    images: ImageSet | None = None,
) -> EmbedPlan:
    """Check the inputs and decide what the store ``out`` of ``folder`` will hold; writes nothing.

    ``images``: the folder already scanned by the caller, else it is scanned here (files that
    decoded into ``out`` or ``reuse`` before are trusted), or read from ``options.pool_list``."""
    out = Path(out)
    check_writable_dir(out)
    if options.batch_size is not None and options.batch_size < 1:
        raise AlfkError("the batch size must be at least 1")
    method = get_estimator(options.pseudo_label).name if options.pseudo_label is not None else None
    ckpt = read_checkpoint(checkpoint)
    arch = ckpt.arch
    explicit_taps = resolve_taps(arch, options.taps) if options.taps not in (None, "") else None
    ref: FeatureStore | None = None
    try:
        if reference is not None:
            ref = open_store(reference)
            _check_reference(ref, ckpt, Path(checkpoint), explicit_taps, options.seed)
        taps = explicit_taps or (ref.taps if ref is not None else resolve_taps(arch, None))
        taps = resolve_taps(arch, list(taps))
        if images is None:
            images = scan_for_store(folder, out, reuse, options)
        method, classes, class_source = _label_source(
            method, images, folder, ref, ckpt, Path(checkpoint)
        )
        labels, not_classes = _remap_labels(images, classes)
        if get_estimator(method).needs_labels and not_classes:
            raise AlfkError(
                f"pseudo-label method {method} needs class sub-folders; {folder} has {not_classes[0]!r}, "
                f"which is not among the classes of {class_source} ({','.join(classes)})"
            )
        if parse_device(options.device).startswith("cuda"):  # a GPU asked for must be there
            from alfk_cli.util.devices import resolve_device

            resolve_device(options.device)
        check_classes(ckpt, classes)
        if get_estimator(method).uses_mc and options.mc.samples < 2:
            raise AlfkError("Monte-Carlo pseudo-labels need at least 2 samples")
        resolved = replace(options, taps=tuple(taps), pseudo_label=method)
        config = _config(ckpt, resolved, classes, ref)
        sizes, mtimes = _file_stats(images)
        reference_data = (
            (ref.z[:], ref.labels[:], ref.scale_dims)
            if ref is not None and get_estimator(method).needs_reference
            else None
        )
    finally:
        if ref is not None:
            ref.close()
    return EmbedPlan(
        out=out, folder=folder, options=resolved, images=images, labels=labels, sizes=sizes,
        mtimes=mtimes, classes=classes, class_source=class_source, not_classes=not_classes,
        checkpoint=ckpt, reference=reference, reference_data=reference_data, config=config,
        config_fingerprint=config_fingerprint(config),
        fingerprint=content_fingerprint(config, images.paths, labels, sizes, mtimes),
    )  # fmt: skip


def scan_for_store(
    folder: str | os.PathLike,
    out: str | os.PathLike,
    reuse: str | os.PathLike | None,
    options: EmbedOptions,
) -> ImageSet:
    """The images of ``folder`` a store ``out`` will hold: walked (stat only; ``strict`` also
    opens each file with PIL), or named by ``options.pool_list``. Files that decoded into ``out``
    or ``reuse`` before are trusted: a pool list's known paths are not stat'ed, and ``strict``
    does not open them again. The one place the scan is decided (the orchestrator scans with it
    before planning, to fail before any model pass)."""
    stores = [Path(out)] + ([Path(reuse)] if reuse is not None and Path(reuse) != Path(out) else [])
    if options.pool_list is not None:
        return scan_pool(
            folder, options.pool_list, strict=options.strict, trusted=trusted_files(*stores)
        )
    return scan_images(
        folder,
        strict=options.strict,
        verify=options.strict,  # else decode failures are caught when embedding
        trusted=trusted_files(*stores) if options.strict else {},
    )


def _config(
    ckpt: CheckpointFile, options: EmbedOptions, classes: list[str], ref: FeatureStore | None
) -> dict:
    """Everything but the image list that determines the store's contents (its fingerprint)."""
    return {
        "schema_version": SCHEMA_VERSION,
        "alfk_version": __version__,
        "arch": ckpt.arch,
        "checkpoint_sha256": ckpt.sha256,
        "classes": list(classes),
        # the reference's contents, not its file bytes: a rewrite with equal data keeps caches
        "reference_data_sha256": ref.data_sha256() if ref is not None else None,
        **options.fingerprint_dict(),  # taps, pseudo_label, mc, seed
    }


def _label_source(
    method: str | None,
    images: ImageSet,
    folder: str | os.PathLike,
    ref: FeatureStore | None,
    ckpt: CheckpointFile,
    model_path: Path,
) -> tuple[str, list[str], str]:
    """The pseudo-label method, the classes, and where the classes come from (for messages)."""
    if ref is None and images.labelled and method in (None, "true"):
        return "true", list(images.classes), str(folder)
    method = method or DEFAULT_ESTIMATOR
    est = get_estimator(method)
    if est.needs_reference and ref is None:
        raise AlfkError(
            f"{method} pseudo-labels need a reference: the validation store embedded from the same "
            "checkpoint and taps (or choose the yhat pseudo-labels)"
        )
    if est.needs_labels and not images.labelled:
        raise AlfkError(
            f"pseudo-label method {method} needs class sub-folders, and {folder} has none"
        )
    if ref is not None:
        return method, ref.classes, f"reference {ref.path}"
    if ckpt.head == "rotation":
        raise AlfkError(
            f"{method} pseudo-labels without a reference need a task checkpoint; {model_path} is "
            "rotation-pretrained (its classifier is untrained)"
        )
    return method, list(ckpt.classes), f"checkpoint {model_path}"


def _file_stats(images: ImageSet) -> tuple[np.ndarray, np.ndarray]:
    """Size and mtime of each image: as scanned, or read now for a hand-made ImageSet."""
    if images.sizes is not None and images.mtimes is not None:
        return images.sizes, images.mtimes
    sizes = np.empty(len(images), dtype=np.int64)
    mtimes = np.empty(len(images), dtype=np.int64)
    for i in range(len(images)):
        st = os.stat(images.absolute(i))
        sizes[i], mtimes[i] = st.st_size, st.st_mtime_ns
    return sizes, mtimes


def _remap_labels(images: ImageSet, classes: list[str]) -> tuple[np.ndarray, list[str]]:
    """The pool's labels as indices into ``classes`` (the reference's or checkpoint's), and the
    first-level sub-folders that are not class names: their images get −1 (unknown). A pool
    split into arbitrary sub-folders (``day1/``, ``day2/``) is thus simply unlabelled."""
    if not images.labelled:
        return np.full(len(images), -1, dtype=np.int64), []
    index = {c: i for i, c in enumerate(classes)}
    unknown = [c for c in images.classes if c not in index]
    table = np.array([index.get(c, -1) for c in images.classes], dtype=np.int64)
    return table[images.labels], unknown


def _check_reference(
    ref: FeatureStore, ckpt: CheckpointFile, model_path: Path, taps, seed: int
) -> None:
    """A reference must be a validation store of the same checkpoint (and taps, when given)."""
    if ref.pseudo_label != "true" or len(ref) == 0 or (np.asarray(ref.labels[:]) < 0).any():
        raise AlfkError(
            f"reference {ref.path} is not a validation store (pseudo_label {ref.pseudo_label!r}); "
            "embed the labelled validation folder without a reference first"
        )
    if ref.checkpoint_sha256 != ckpt.sha256:
        raise AlfkError(
            f"reference {ref.path} was embedded with another checkpoint "
            f"(sha256 {ref.checkpoint_sha256[:12]}…, {model_path} is {ckpt.sha256[:12]}…)"
        )
    if taps is not None and tuple(taps) != ref.taps:
        raise AlfkError(
            f"reference {ref.path} was embedded with taps {','.join(ref.taps)}, not {','.join(taps)}"
        )
    if ckpt.head == "rotation" and ref.seed is not None and ref.seed != seed:
        raise AlfkError(
            f"reference {ref.path} was embedded with seed {ref.seed}, which initialised the "
            f"classifier of the rotation checkpoint {model_path}; use the same seed"
        )


__all__ = ["EmbedPlan", "plan_embed", "scan_for_store"]
