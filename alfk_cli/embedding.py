"""The whole ``alfk embed`` job as one library function: images -> descriptors -> feature store.

Which labels g is computed with (docs/algorithm.md §2-3):

- a labelled folder (class sub-folders) without ``reference`` is a **validation set**: g uses the
  true labels, ``pseudo_label`` is ``true`` and the classes are the folder's;
- anything else is a **pool**: g uses the estimator (default ``p_yz``, which needs
  ``reference``: a validation store made from the same checkpoint and taps). ``true`` needs class
  sub-folders; ``yhat`` and the MC estimators without a reference use the task checkpoint's
  classes (a rotation checkpoint has no task classifier and is refused). A pool with class
  sub-folders (simulation) keeps its true labels in ``labels``, mapped to the classes of the
  reference (or checkpoint), while g uses the estimator; images under first-level sub-folders
  that are not class names (``day1/``, ``day2/``) are unlabelled (−1).

Failures: a bad checkpoint, an unwritable output folder, a mismatched reference or an empty
folder raise AlfkError before any file is created. Once rows are being computed, any failure
(an image that fails to decode, an interrupt, a crash) leaves only the resumable
``.NAME.partial`` file beside ``out``, never a file under ``out`` itself; re-running with the same
arguments continues from it (see ``store``), other arguments start over.
"""

from __future__ import annotations

import json
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import torch
from rich.progress import Progress

from alfk_cli import __version__
from alfk_cli.atomic import check_writable_dir, partial_path
from alfk_cli.checkpoint import load_checkpoint, task_model
from alfk_cli.devices import resolve_device
from alfk_cli.errors import AlfkError
from alfk_cli.estimators import describe_images, get_estimator
from alfk_cli.images import ImageDataset, ImageSet, decode_failure, printable, scan_images
from alfk_cli.models import resolve_taps, scale_dims
from alfk_cli.progress import make_progress
from alfk_cli.pseudolabels import MCConfig, NearestReference
from alfk_cli.reproducible import loader_generator
from alfk_cli.store import (
    SCHEMA_VERSION,
    FeatureStore,
    StoreHeader,
    StoreWriter,
    config_fingerprint,
    content_fingerprint,
    open_store,
)

DEFAULT_BATCH = {"lenet": 256, "resnet10": 128, "resnet18": 32}


@dataclass
class EmbedSummary:
    out: Path
    images: int  # rows in the store
    skipped: list[tuple[str, str]]  # (relative path, reason) of files that are not readable images
    seconds: float
    computed: int  # rows computed by this run
    reused: int  # rows copied from the ``reuse`` store
    resumed: int  # rows already in the partial file of an interrupted run
    pseudo_label: str
    classes: list[str]
    taps: tuple[str, ...]
    device: str = "cpu"
    pseudo_accuracy: float | None = None  # pseudo == labels, over images with known labels
    notes: list[str] = field(default_factory=list)  # e.g. why a reuse store was not used

    @property
    def images_per_second(self) -> float:
        return self.computed / self.seconds if self.seconds > 0 else 0.0


def trusted_files(*stores: str | os.PathLike | None) -> dict[str, tuple[int, int]]:
    """(size, mtime_ns) of every image in existing complete stores: files that decoded before."""
    trusted: dict[str, tuple[int, int]] = {}
    for path in stores:
        if path is None or not Path(path).is_file():
            continue
        try:
            with open_store(path) as st:
                if "size" in st.file and "mtime_ns" in st.file:
                    trusted.update(
                        zip(
                            st.paths,
                            zip(st.file["size"][:].tolist(), st.file["mtime_ns"][:].tolist()),
                        )
                    )
        except AlfkError:
            continue
    return trusted


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
    ref: FeatureStore, ckpt_sha: str, model_path: Path, taps, seed: int, rotation: bool
):
    if ref.pseudo_label != "true" or len(ref) == 0 or (np.asarray(ref.labels[:]) < 0).any():
        raise AlfkError(
            f"reference {ref.path} is not a validation store (pseudo_label {ref.pseudo_label!r}); "
            "embed the labelled validation folder without --reference first"
        )
    if ref.checkpoint_sha256 != ckpt_sha:
        raise AlfkError(
            f"reference {ref.path} was embedded with another checkpoint "
            f"(sha256 {ref.checkpoint_sha256[:12]}…, {model_path} is {ckpt_sha[:12]}…)"
        )
    if taps is not None and tuple(taps) != ref.taps:
        raise AlfkError(
            f"reference {ref.path} was embedded with taps {','.join(ref.taps)}, not {','.join(taps)}"
        )
    if rotation and ref.seed is not None and ref.seed != seed:
        raise AlfkError(
            f"reference {ref.path} was embedded with --seed {ref.seed}, which initialised the classifier "
            f"of the rotation checkpoint {model_path}; use the same seed"
        )


def _reusable_rows(
    reuse: Path | None,
    cfg_fp: str,
    header: StoreHeader,
    done: np.ndarray,
    notes: list[str],
) -> tuple[FeatureStore | None, np.ndarray, np.ndarray]:
    """(store, source rows, destination rows) of images unchanged since the ``reuse`` store."""
    empty = np.empty(0, dtype=np.int64)
    if reuse is None:
        return None, empty, empty
    if not reuse.exists():  # a first run: nothing to say
        return None, empty, empty
    try:
        prev = open_store(reuse)
    except AlfkError as exc:
        notes.append(f"nothing reused: {exc}")
        return None, empty, empty
    if (
        prev.get_attr("config_fingerprint") != cfg_fp
        or "size" not in prev.file
        or "mtime_ns" not in prev.file
    ):
        notes.append(
            f"nothing reused: {reuse} was made with other options, checkpoint or reference"
        )
        prev.close()
        return None, empty, empty
    where = {p: i for i, p in enumerate(prev.paths)}
    p_size, p_mtime = prev.file["size"][:], prev.file["mtime_ns"][:]
    src, dst = [], []
    for i, path in enumerate(header.paths):
        j = where.get(path)
        if (
            j is not None
            and not done[i]
            and p_size[j] == header.sizes[i]
            and p_mtime[j] == header.mtime_ns[i]
        ):
            src.append(j)
            dst.append(i)
    if not dst:
        prev.close()
        return None, empty, empty
    return prev, np.asarray(src, dtype=np.int64), np.asarray(dst, dtype=np.int64)


def embed_folder(
    model_path: str | os.PathLike,
    images_dir: str | os.PathLike,
    out: str | os.PathLike,
    reference: str | os.PathLike | None = None,
    taps: str | list[str] | tuple[str, ...] | None = None,
    pseudo_label: str | None = None,
    mc_samples: int = 32,
    batch_size: int | None = None,
    workers: int = 2,
    device: str = "auto",
    seed: int = 0,
    strict: bool = False,
    quiet: bool = False,
    progress: Progress | None = None,
    reuse: str | os.PathLike | None = None,
    mc_config: MCConfig | None = None,
    images: ImageSet | None = None,
) -> EmbedSummary:
    """Embed every image under ``images_dir`` into the feature store ``out`` (z, g, logits, labels).

    ``taps``: a preset name (``L80``), a comma-separated list or list of tap names; default: the
    reference's taps, else the architecture's default preset. ``batch_size`` defaults per
    architecture (lenet 256, resnet10 128, resnet18 32). ``reuse``: a previous complete store of
    (an earlier version of) the same folder; rows of images whose relative path, size and mtime
    are unchanged are copied when everything else matches. ``progress``: a rich Progress to add a
    task to; without one a progress bar is shown on stderr unless ``quiet``. ``mc_config``
    overrides the Monte-Carlo settings (``mc_samples`` sets K). ``images``: the folder already
    scanned by the caller (``scan_images(images_dir)``), to avoid walking it twice.
    """
    t0 = time.perf_counter()
    out = Path(out)
    check_writable_dir(out)
    if batch_size is not None and batch_size < 1:
        raise AlfkError("--batch-size must be at least 1")
    method = get_estimator(pseudo_label).name if pseudo_label is not None else None
    ckpt = load_checkpoint(model_path)
    model_path = Path(model_path)
    rotation = ckpt.head == "rotation"
    arch = ckpt.arch
    spec = ckpt.input
    explicit_taps = resolve_taps(arch, taps) if taps not in (None, "") else None

    ref: FeatureStore | None = None
    try:
        if reference is not None:
            ref = open_store(reference)
            _check_reference(ref, ckpt.sha256, model_path, explicit_taps, seed, rotation)
        tap_names = explicit_taps or (ref.taps if ref is not None else resolve_taps(arch, None))
        tap_names = resolve_taps(arch, list(tap_names))
        dims = scale_dims(arch, tap_names)

        if images is None:
            images = scan_images(images_dir, strict=strict, trusted=trusted_files(out, reuse))
        if ref is None and images.labelled and method in (None, "true"):
            method, classes, class_source = "true", list(images.classes), str(images_dir)
        else:
            method = method or "p_yz"
            if method == "p_yz" and ref is None:
                raise AlfkError(
                    "p_yz pseudo-labels need --reference: the validation store embedded from the same "
                    "checkpoint and taps (or choose --pseudo-label yhat)"
                )
            if method == "true" and not images.labelled:
                raise AlfkError(
                    f"--pseudo-label true needs class sub-folders, and {images_dir} has none"
                )
            if ref is not None:
                classes, class_source = ref.classes, f"reference {ref.path}"
            elif rotation:
                raise AlfkError(
                    f"{method} pseudo-labels without --reference need a task checkpoint; {model_path} is "
                    "rotation-pretrained (its classifier is untrained)"
                )
            else:
                classes, class_source = list(ckpt.classes), f"checkpoint {model_path}"
        labels, not_classes = _remap_labels(images, classes)
        if method == "true" and not_classes:
            raise AlfkError(
                f"--pseudo-label true needs class sub-folders; {images_dir} has {not_classes[0]!r}, "
                f"which is not among the classes of {class_source} ({','.join(classes)})"
            )
        dev = resolve_device(device)
        model = task_model(ckpt, classes, seed).to(dev)
        mc_cfg = mc_config or MCConfig(samples=mc_samples)
        if get_estimator(method).uses_mc and mc_cfg.samples < 2:
            raise AlfkError("Monte-Carlo pseudo-labels need --mc-samples of at least 2")

        config = {
            "schema_version": SCHEMA_VERSION,
            "alfk_version": __version__,
            "arch": arch,
            "checkpoint_sha256": ckpt.sha256,
            "taps": list(tap_names),
            "classes": list(classes),
            "pseudo_label": method,
            "mc": mc_cfg.params() if get_estimator(method).uses_mc else None,
            # the reference's contents, not its file bytes: a rewrite with equal data keeps caches
            "reference_data_sha256": ref.data_sha256() if ref is not None else None,
            "seed": int(seed),
        }
        cfg_fp = config_fingerprint(config)
        sizes, mtimes = _file_stats(images)
        fingerprint = content_fingerprint(config, images.paths, labels, sizes, mtimes)
        header = StoreHeader(
            image_root=str(Path(images_dir)),
            arch=arch,
            checkpoint_sha256=ckpt.sha256,
            pseudo_label=method,
            taps=tap_names,
            scale_dims=dims,
            classes=classes,
            paths=images.paths,
            labels=labels,
            sizes=sizes,
            mtime_ns=mtimes,
            extra_attrs={
                "seed": np.int64(seed),
                "embed_config": json.dumps(config, sort_keys=True),
                "config_fingerprint": cfg_fp,
                "reference_path": str(reference) if reference is not None else "",
            },
        )
        labeler = (
            NearestReference(ref.z[:], ref.labels[:], ref.scale_dims) if method == "p_yz" else None
        )
    finally:
        if ref is not None:
            ref.close()

    stored = _up_to_date(out, fingerprint)
    if stored is not None:  # same checkpoint, options, reference and files: nothing to do
        stored_pseudo, stored_labels, undecodable = stored
        return EmbedSummary(
            out=out,
            images=len(stored_pseudo),
            skipped=list(images.skipped) + undecodable,
            seconds=time.perf_counter() - t0,
            computed=0,
            reused=len(images),
            resumed=0,
            pseudo_label=method,
            classes=list(classes),
            taps=tuple(tap_names),
            device=str(dev),
            pseudo_accuracy=_pseudo_accuracy(stored_pseudo, stored_labels, method),
            notes=[f"{out} is up to date"],
        )
    bs = batch_size or DEFAULT_BATCH.get(arch, 64)
    earlier = _set_aside_partial(out, fingerprint, cfg_fp)
    writer = StoreWriter.open(out, header, fingerprint, chunk_rows=bs)
    notes: list[str] = []
    if not_classes and len(not_classes) < len(images.classes):
        notes.append(
            f"sub-folders of {images_dir} that are not classes of {class_source}: "
            f"{', '.join(not_classes[:5])}{' …' if len(not_classes) > 5 else ''}; their images are unlabelled"
        )
    prev = None
    try:
        resumed = writer.resumed + _resume_rows(earlier, writer, header)
        reused = 0
        prev, src, dst = _reusable_rows(
            Path(reuse) if reuse is not None else None, cfg_fp, header, writer.done, notes
        )
        if prev is not None:
            writer.copy_rows(prev, src, dst)
            reused = len(dst)
            prev.close()
            prev = None
        work = np.flatnonzero(~writer.done)
        writer.check_space(len(work))  # before the first model pass, not when the disk is full
        own_progress = progress is None and not quiet
        ctx = make_progress(quiet) if own_progress else nullcontext(progress)
        t_compute = time.perf_counter()
        with ctx as prog:
            task = None
            if prog is not None:
                task = prog.add_task(
                    f"embed {Path(images_dir).name or images_dir}",
                    total=len(images),
                    completed=len(images) - len(work),
                    status="",
                )
            computed, failed = _compute(
                writer, model, images, labels, work, spec, tap_names, method, labeler, mc_cfg, seed,
                bs, workers, dev, prog, task, strict,
            )  # fmt: skip
            if prog is not None and task is not None:
                rate = computed / max(time.perf_counter() - t_compute, 1e-9)
                prog.update(task, status=f"{rate:.0f} img/s")
        kept = np.ones(len(labels), dtype=bool)
        kept[[r for r, _ in failed]] = False
        accuracy = _pseudo_accuracy(writer.file["pseudo"][:][kept], labels[kept], method)
        writer.finish(skipped=failed)
    except BaseException:
        if prev is not None:
            prev.close()
        writer.close()  # keep the partial file: the next run resumes it
        raise
    return EmbedSummary(
        out=out,
        images=int(kept.sum()),
        skipped=list(images.skipped) + [(images.paths[r], why) for r, why in failed],
        seconds=time.perf_counter() - t0,
        computed=computed,
        reused=reused,
        resumed=resumed,
        pseudo_label=method,
        classes=list(classes),
        taps=tuple(tap_names),
        device=str(dev),
        pseudo_accuracy=accuracy,
        notes=notes,
    )


def _set_aside_partial(out: Path, fingerprint: str, cfg_fp: str) -> Path | None:
    """An interrupted run's partial file made with the same options but another image list (the
    folder changed before the re-run): renamed aside, so the new run copies its finished rows
    for the images that are unchanged instead of recomputing them. None when there is none."""
    tmp = partial_path(out)
    try:
        with h5py.File(tmp, "r") as f:
            usable = (
                f.attrs.get("fingerprint") != fingerprint
                and f.attrs.get("config_fingerprint") == cfg_fp
                and all(k in f for k in ("_done", "paths", "size", "mtime_ns", "z", "g"))
            )
    except OSError:  # none, locked by a running embed (StoreWriter.open says so), or damaged
        return None
    if not usable:
        return None
    aside = tmp.with_name(tmp.name.replace(".partial", ".earlier.partial"))
    os.replace(tmp, aside)
    return aside


def _resume_rows(earlier: Path | None, writer: StoreWriter, header: StoreHeader) -> int:
    """Copy the finished rows of ``earlier`` (see ``_set_aside_partial``) whose image has the
    same relative path, size and mtime into ``writer``; delete ``earlier``. Returns the count."""
    if earlier is None:
        return 0
    try:
        f = h5py.File(earlier, "r")
    except OSError:
        earlier.unlink(missing_ok=True)
        return 0
    try:
        done = f["_done"][:].astype(bool)
        old = {
            (p, int(sz), int(mt)): j
            for j, (p, sz, mt) in enumerate(
                zip(f["paths"].asstr()[:], f["size"][:], f["mtime_ns"][:])
            )
            if done[j]
        }
        src, dst = [], []
        for i, key in enumerate(zip(header.paths, header.sizes.tolist(), header.mtime_ns.tolist())):
            j = old.get(key)
            if j is not None and not writer.done[i]:
                src.append(j)
                dst.append(i)
        if dst:
            writer.copy_rows(FeatureStore(earlier, f), np.asarray(src), np.asarray(dst))
    finally:
        f.close()
    earlier.unlink(missing_ok=True)
    return len(dst)


def _pseudo_accuracy(pseudo: np.ndarray, labels: np.ndarray, method: str) -> float | None:
    """How often the pseudo-labels equal the known labels (None when there are none to compare)."""
    known = labels >= 0
    if method == "true" or not known.any():
        return None
    return float((pseudo[known] == labels[known]).mean())


def _up_to_date(
    out: Path, fingerprint: str
) -> tuple[np.ndarray, np.ndarray, list[tuple[str, str]]] | None:
    """(pseudo-labels, labels, images that failed to decode) stored in ``out`` when it is a
    complete store with this exact fingerprint, else None."""
    if not out.is_file():
        return None
    try:
        with open_store(out) as existing:
            if existing.get_attr("fingerprint") != fingerprint:
                return None
            f = existing.file
            failed = []
            if "skipped_paths" in f:
                failed = list(
                    zip(f["skipped_paths"].asstr()[:].tolist(), f["skipped_reasons"].asstr()[:])
                )
            return existing.pseudo[:], existing.labels[:], failed
    except AlfkError:
        return None


def _compute(
    writer: StoreWriter,
    model,
    images: ImageSet,
    labels: np.ndarray,
    work: np.ndarray,
    spec,
    taps,
    method: str,
    labeler: NearestReference | None,
    mc_cfg: MCConfig,
    seed: int,
    batch_size: int,
    workers: int,
    dev: torch.device,
    prog: Progress | None,
    task,
    strict: bool = False,
) -> tuple[int, list[tuple[int, str]]]:
    """Compute and write the rows ``work``, batch by batch. Returns how many were computed and
    the (row, reason) of images that failed to decode: skipped and listed like the files the
    scan skipped (``strict``: an error instead)."""
    failed: list[tuple[int, str]] = []
    if len(work) == 0:
        return 0, failed
    ds = ImageDataset(images, spec, rows=work.tolist())
    loader = torch.utils.data.DataLoader(
        ds,
        batch_size=batch_size,
        shuffle=False,
        num_workers=max(0, workers),
        pin_memory=dev.type == "cuda",
        persistent_workers=False,
        generator=loader_generator(),  # not the caller's global RNG
    )
    label_t = torch.from_numpy(labels)
    done = 0
    t0 = time.perf_counter()
    for img, _, rows, ok in loader:
        if not bool(ok.all()):
            for bad in rows[~ok].tolist():
                reason = decode_failure(images.absolute(bad), spec)
                if strict:
                    raise AlfkError(f"{printable(str(images.absolute(bad)))}: {reason}")
                failed.append((int(bad), reason))
            img, rows = img[ok], rows[ok]
            if len(rows) == 0:
                continue
        rows_np = rows.numpy().astype(np.int64)
        img = img.to(dev, non_blocking=True)
        z, g, logits, used = describe_images(
            model, img, spec, taps, method, labels=label_t[rows].to(dev), reference=labeler,
            names=[images.paths[r] for r in rows_np], seed=seed, mc_cfg=mc_cfg,
        )  # fmt: skip
        writer.write_rows(
            rows_np,
            z.float().cpu().numpy(),
            g.float().cpu().numpy(),
            logits.float().cpu().numpy(),
            used.cpu().numpy().astype(np.int64),
        )
        done += len(rows_np)
        if prog is not None and task is not None:
            rate = done / max(time.perf_counter() - t0, 1e-9)
            prog.update(task, advance=len(rows_np), status=f"{rate:.0f} img/s")
    return done, failed


__all__ = ["DEFAULT_BATCH", "EmbedSummary", "embed_folder"]
