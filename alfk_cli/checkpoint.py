"""Torch checkpoints that carry their own metadata, so later commands need no repeated flags.

A checkpoint is a plain dict (loadable with ``weights_only=True``): the state dict plus the
architecture, the class names, the input spec and provenance. It is written atomically.

``read_checkpoint`` reads the file once: the metadata without torch (``torchzip``; torch itself
when that reader cannot tell) and the sha256 of the bytes, which stores and scores files record.
The weights (``CheckpointFile.load``) come from the same bytes, so they always match that hash;
torch is imported only then.

A checkpoint of a family architecture (``timm:NAME``) also carries the architecture's record
(``arch_spec``: taps, widths, presets, input, how to build it; ``timm_backbones``); reading the
checkpoint makes the architecture known from it, so that naming its taps needs no timm. The
built-ins' checkpoints have no such key (their bytes are unchanged).
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from alfk_cli import __version__
from alfk_cli.archs import ROTATION_CLASSES, InputSpec, get_arch, remember_arch
from alfk_cli.atomic import atomic_output
from alfk_cli.errors import AlfkError
from alfk_cli.reproducible import created_stamp, save_torch
from alfk_cli.torchzip import NotReadable, read_pickled

if TYPE_CHECKING:
    import torch

    from alfk_cli.models import TapNet

FORMAT = "alfk-checkpoint"
FORMAT_VERSION = 1


@dataclass
class Checkpoint:
    arch: str
    classes: list[str]  # class names in logit order; the rotation head has ROTATION_CLASSES
    # "classifier" (task model), "rotation" (self-supervised pretraining), "imagenet"
    # (torchvision weights, alfk_cli.backbones) or "backbone" (a timm weights file's trunk)
    head: str
    input: InputSpec
    state_dict: dict[str, torch.Tensor]
    info: dict[str, Any] = field(default_factory=dict)  # hyper-parameters, metrics, provenance
    path: Path | None = None
    sha256: str = ""

    def build(self) -> TapNet:
        from alfk_cli.models import build_model

        # seeded only so that the throw-away initialisation leaves the global RNG alone
        model = build_model(self.arch, len(self.classes), seed=0)
        model.load_state_dict(self.state_dict)
        return model


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_checkpoint(
    path: str | os.PathLike,
    model: TapNet,
    arch: str,
    classes: list[str],
    head: str = "classifier",
    info: dict[str, Any] | None = None,
) -> None:
    """Write ``model`` with its metadata to ``path`` atomically (temporary name, then rename)."""
    spec = get_arch(arch)
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "alfk_version": __version__,
        "created": created_stamp(),  # no wall-clock time: equal runs give equal bytes
        "arch": arch,
        "classes": list(classes),
        "head": head,
        "input": asdict(spec.input),
        "info": dict(info or {}),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    if spec.record is not None:  # what rebuilds a timm:NAME model (and answers without timm)
        payload["arch_spec"] = spec.record
    with atomic_output(path) as tmp:
        save_torch(payload, tmp)  # the same bytes whatever the file's name


@dataclass(frozen=True)
class CheckpointFile:
    """A checkpoint's metadata and sha256, read without torch, with the bytes they came from."""

    path: Path
    arch: str
    classes: list[str]
    head: str
    input: InputSpec
    info: dict[str, Any]
    sha256: str
    data: bytes = field(repr=False)

    def load(self) -> Checkpoint:
        """The checkpoint with its weights (imports torch), from the same bytes."""
        return checkpoint_from_dict(
            _torch_load(self.data, self.path), self.path, sha256=self.sha256
        )


def read_checkpoint(path: str | os.PathLike, arch: str | None = None) -> CheckpointFile:
    """Read a checkpoint's metadata; ``arch`` (when given) must match the one it was made for.

    The same checks and messages as :func:`load_checkpoint`, without importing torch when the
    file is a checkpoint ``torchzip`` can read."""
    path = Path(path)
    if not path.is_file():
        raise AlfkError(f"checkpoint {path} does not exist")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise AlfkError(f"cannot read checkpoint {path}: {exc.strerror}") from None
    try:
        raw = read_pickled(data)
    except NotReadable:
        raw = None
    if not is_checkpoint_dict(raw):  # in doubt, torch decides (and words the error)
        raw = _torch_load(data, path)
    meta = _metadata(raw, path, arch)
    return CheckpointFile(path=path, **meta, sha256=hashlib.sha256(data).hexdigest(), data=data)


def _torch_load(data: bytes, path: Path) -> Any:
    import torch

    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for truncated or foreign files
        raise AlfkError(
            f"cannot read checkpoint {path}: not an alfk checkpoint ({type(exc).__name__})"
        ) from None


def load_checkpoint(path: str | os.PathLike, arch: str | None = None) -> Checkpoint:
    """Read a checkpoint with its weights; ``arch`` (when given) must match its architecture."""
    return read_checkpoint(path, arch).load()


def is_checkpoint_dict(raw: object) -> bool:
    """Whether ``raw`` (what ``torch.load`` returned) claims to be an alfk checkpoint."""
    return isinstance(raw, dict) and raw.get("format") == FORMAT


def _metadata(raw: object, path: Path, arch: str | None) -> dict[str, Any]:
    """The checked metadata fields of the checkpoint dict ``raw`` (of the file ``path``)."""
    if not isinstance(raw, dict) or not is_checkpoint_dict(raw):
        raise AlfkError(f"{path} is not an alfk checkpoint")
    if raw.get("format_version") != FORMAT_VERSION:
        raise AlfkError(
            f"{path} has checkpoint format {raw.get('format_version')}; this alfk reads {FORMAT_VERSION}"
        )
    if arch is not None and raw["arch"] != arch:
        raise AlfkError(f"checkpoint {path} was made for {raw['arch']}, not {arch}")
    if isinstance(raw.get("arch_spec"), dict):
        try:
            remember_arch(str(raw["arch"]), raw["arch_spec"])
        except AlfkError as exc:
            raise AlfkError(f"checkpoint {path}: {exc}") from None
    inp = raw["input"]
    return {
        "arch": raw["arch"],
        "classes": list(raw["classes"]),
        "head": raw["head"],
        "input": InputSpec(inp["size"], inp["channels"], tuple(inp["mean"]), tuple(inp["std"])),
        "info": dict(raw.get("info", {})),
    }


def checkpoint_from_dict(
    raw: object, path: Path, arch: str | None = None, *, sha256: str | None = None
) -> Checkpoint:
    """The :class:`Checkpoint` in ``raw``, the dict loaded from the file ``path`` (whose sha256
    is ``sha256`` when the caller already has it)."""
    meta = _metadata(raw, path, arch)
    assert isinstance(raw, dict), "_metadata checked it"
    return Checkpoint(
        **meta,
        state_dict=raw["state_dict"],
        path=path,
        sha256=sha256 if sha256 is not None else file_sha256(path),
    )


def check_classes(ckpt: Checkpoint | CheckpointFile, classes: list[str]) -> None:
    """A task checkpoint embeds only images of its own classes (other heads get a fresh one)."""
    if ckpt.head == "classifier" and ckpt.classes != list(classes):
        raise AlfkError(
            f"checkpoint {ckpt.path} was trained on classes {','.join(ckpt.classes)}, "
            f"but the images have {','.join(classes)}"
        )


def init_from(model: TapNet, ckpt: Checkpoint) -> list[str]:
    """Load every weight of ``ckpt`` into ``model`` except a classifier that does not fit.

    The classifier is skipped when its shape differs or when it is not a task classifier: a
    rotation head (a 4-class task must not inherit the rotation classifier) or the ImageNet head
    of torchvision weights (:mod:`alfk_cli.backbones`). Returns the names that were skipped.
    """
    own = model.state_dict()
    skip_head = ckpt.head != "classifier"
    skipped, load = [], {}
    for name, tensor in ckpt.state_dict.items():
        is_head = name.startswith("classifier.")
        if name not in own:
            raise AlfkError(
                f"checkpoint {ckpt.path} does not fit this {ckpt.arch} model (unexpected {name})"
            )
        if is_head and (skip_head or own[name].shape != tensor.shape):
            skipped.append(name)
            continue
        if own[name].shape != tensor.shape:
            raise AlfkError(f"checkpoint {ckpt.path} does not fit: {name} is {tuple(tensor.shape)}")
        load[name] = tensor
    missing = [
        k for k in own if k not in load and k not in skipped and not k.startswith("classifier.")
    ]
    if missing:
        raise AlfkError(f"checkpoint {ckpt.path} lacks {missing[0]} for a {ckpt.arch} model")
    model.load_state_dict(load, strict=False)
    return skipped


def task_model(ckpt: Checkpoint, classes: list[str], seed: int = 0) -> TapNet:
    """The task model for ``classes`` from any checkpoint.

    A task checkpoint with the same classes is used as is; a rotation-pretrained one (or one
    with other classes) keeps its trunk and gets a fresh, seeded classifier for ``classes``.
    """
    from alfk_cli.models import build_model

    check_classes(ckpt, classes)
    if ckpt.head == "classifier":
        return ckpt.build()
    model = build_model(ckpt.arch, len(classes), seed=seed)
    init_from(model, ckpt)
    return model


__all__ = [
    "ROTATION_CLASSES",
    "Checkpoint",
    "CheckpointFile",
    "check_classes",
    "checkpoint_from_dict",
    "file_sha256",
    "init_from",
    "is_checkpoint_dict",
    "load_checkpoint",
    "read_checkpoint",
    "save_checkpoint",
    "task_model",
]
