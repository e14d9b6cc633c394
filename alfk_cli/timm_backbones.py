"""timm backbones as alfk architectures: ``--arch timm:NAME`` (or ``timm:NAME@SIZE``).

Any timm model that supports ``features_only`` is a backbone. alfk builds it with
``timm.create_model(NAME, features_only=True, pretrained=False)`` and taps the stages its
``feature_info`` names (``act1``, ``layer1``... for a ResNet; ``blocks.9``... for a ViT): a
forward hook on each stage's module catches its output, and on the earliest requested tap makes
it a grad-requiring leaf, so z and g come out exactly as for the built-ins (docs/algorithm.md §1-2).
Every tap is handed on in NCHW form (NHWC stage outputs are permuted, ViT tokens ``[B, N, C]``
become ``[B, C, N, 1]``), so φ is the mean over positions (tokens) for every layout. The head is
alfk's own, as for the built-ins: global average pooling of the last tap and a linear classifier.

What a timm architecture eats comes from its pretrained config (``timm.get_pretrained_cfg``, no
download): input size (``input_size``; ``@SIZE`` overrides it, passed to timm as ``img_size``
for fixed-size models such as ViTs), channels, mean and std. Its tap presets are named by total
length like the paper's (docs/design.md): the last stage, the last two (the default, as L768 is
layer3+layer4 of a ResNet), the last three, and all of them.

Nothing is downloaded: weights come from a local file (``--init FILE``: a timm or Hugging Face
state dict, ``.safetensors``, ``.pth`` or ``.bin``, read with ``weights_only=True``) and go
through timm's own checkpoint filter (so a ViT's position embedding is resized to ``@SIZE``).
What a checkpoint needs to rebuild the model, and to answer presets and widths without timm, is
the record :func:`timm_record` returns, which checkpoints carry (``checkpoint.py``).
"""

from __future__ import annotations

import importlib.metadata
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import timm
import torch
from torch import nn

from alfk_cli.archs import TIMM_PREFIX, get_arch, timm_name
from alfk_cli.errors import AlfkError
from alfk_cli.models import TapNet

if TYPE_CHECKING:
    from alfk_cli.checkpoint import Checkpoint

# Plain SGD defaults for any backbone (the built-in ResNets use 0.1); pass --lr for your model.
TRAIN_DEFAULTS = {"lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4, "batch_size": 64}
EXAMPLES = ("resnet10t", "mobilenetv3_small_050", "convnext_atto", "vit_tiny_patch16_224@64")
HEAD = "backbone"  # the Checkpoint.head of weights from a file: init_from keeps only the trunk


def _nchw(t: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "NHWC":
        return t.permute(0, 3, 1, 2)
    if layout == "NLC":
        return t.transpose(1, 2).unsqueeze(-1)
    return t[:, :, None, None] if layout == "NC" else t


def _native(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The inverse of :func:`_nchw` (views both ways, so the strides are the module's own)."""
    if layout == "NHWC":
        return t.permute(0, 2, 3, 1)
    if layout == "NLC":
        return t.squeeze(-1).transpose(1, 2)
    return t[:, :, 0, 0] if layout == "NC" else t


@dataclass(frozen=True)
class TapPoint:
    """One tap: its name, the module inside the body, the hook kind and the module's layout."""

    name: str
    path: str
    hook: str  # "forward" (the module's output) or "forward_pre" (its input), as timm says
    layout: str  # NCHW, NHWC, NLC or NC
    copy: bool = False  # the model changes this tensor in place later: hand on a copy


def _hook(module: nn.Module, point: TapPoint, catch: Callable[[torch.Tensor], torch.Tensor]):
    """Register ``catch`` on ``point``'s tensor; what it returns replaces that tensor."""
    if point.hook == "forward_pre":
        return module.register_forward_pre_hook(lambda _m, args: (catch(args[0]), *args[1:]))

    def forward(_m: nn.Module, _inp: Any, out: Any) -> Any:
        if isinstance(out, (tuple, list)):
            return type(out)((catch(out[0]), *out[1:]))
        return catch(out)

    return module.register_forward_hook(forward)


class TimmTapNet(TapNet):
    """A timm ``features_only`` body tapped by hooks, with alfk's pooling head and classifier.

    ``stage_names`` are the taps, in the body's order; there is no ``stages`` chain (timm's
    feature extractors are not all sequential), so the taps are read by hooks instead."""

    def __init__(self, body: nn.Module, points: list[TapPoint], classifier: nn.Linear):
        nn.Module.__init__(self)
        self.body = body
        self.points = list(points)
        self.stage_names = [p.name for p in points]
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = classifier

    def forward_taps(
        self, x: torch.Tensor, taps: Any, leaf_first_tap: bool = False
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        unknown = [t for t in taps if t not in self.stage_names]
        if unknown:
            raise AlfkError(
                f"unknown tap {unknown[0]!r}; this model has {', '.join(self.stage_names)}"
            )
        wanted = set(taps)
        leaf = next((p.name for p in self.points if p.name in wanted), None)
        got: dict[str, torch.Tensor] = {}
        last = self.points[-1]

        def catcher(p: TapPoint) -> Callable[[torch.Tensor], torch.Tensor]:
            def catch(t: torch.Tensor) -> torch.Tensor:
                if leaf_first_tap and p.name == leaf:
                    t = t.detach()
                    got[p.name] = _nchw(t, p.layout).requires_grad_(True)
                else:
                    got[p.name] = _nchw(t, p.layout)
                out = _native(got[p.name], p.layout)  # the stream goes on through the tap
                return out.clone() if p.copy else out

            return catch

        handles = [
            _hook(self.body.get_submodule(p.path), p, catcher(p))
            for p in self.points
            if p.name in wanted or p is last
        ]
        try:
            self.body(x)
        finally:
            for h in handles:
                h.remove()
        return self.classifier(self.head(got[last.name])), [got[t] for t in taps]


def _create(model: str, kwargs: dict[str, Any], state_dict: dict | None = None) -> nn.Module:
    """timm's ``features_only`` body of ``model``; ``state_dict``: weights timm loads through the
    model's own filter (no other source is ever consulted: nothing downloads)."""
    extra: dict[str, Any] = {}
    if state_dict is not None:
        source = {"state_dict": state_dict, "file": None, "url": None, "hf_hub_id": None}
        extra = {"pretrained_cfg_overlay": {**source, "source": None}}
    try:
        return timm.create_model(
            model, pretrained=state_dict is not None, features_only=True, **kwargs, **extra
        )
    except Exception as exc:  # timm raises RuntimeError, TypeError, AssertionError, ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        what = "load these weights" if state_dict is not None else "be tapped (features_only)"
        raise AlfkError(
            f"timm model {model} cannot {what}: {type(exc).__name__}: {first}"
        ) from None


def _find(body: nn.Module, module: str) -> str:
    """Where ``feature_info``'s module name lives in the features body: timm flattens one level
    of Sequential (``stages.0`` -> ``stages_0``) or wraps the model (``model.``, ``body.``)."""
    for path in (module, module.replace(".", "_", 1), f"model.{module}", f"body.{module}"):
        try:
            body.get_submodule(path)
            return path
        except AttributeError:
            continue
    raise AlfkError(f"cannot find the feature module {module} in the timm features model")


def _layout(shape: tuple[int, ...], channels: int, where: str) -> str:
    """The layout of a stage output of ``shape`` whose feature_info width is ``channels``."""
    for layout, rank, axis in (("NCHW", 4, 1), ("NHWC", 4, 3), ("NLC", 3, 2), ("NC", 2, 1)):
        if len(shape) == rank and shape[axis] == channels:
            return layout
    raise AlfkError(f"cannot tap {where}: it gives {list(shape)}, not {channels} channels")


def _presets(taps: list[str], dims: dict[str, int]) -> tuple[dict[str, list[str]], str]:
    """The paper-style presets, named by total length: the last 1, 2, 3 and all stages."""
    presets: dict[str, list[str]] = {}
    for k in dict.fromkeys((1, 2, 3, len(taps))):
        chosen = taps[-k:]
        presets.setdefault(f"L{sum(dims[t] for t in chosen)}", chosen)
    default = f"L{sum(dims[t] for t in taps[-2:])}"
    return presets, default


def _input(model: str, size: int | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(InputSpec fields, create_model kwargs) from the pretrained config."""
    cfg = timm.get_pretrained_cfg(model)
    if cfg is None or not cfg.input_size:
        raise AlfkError(f"timm model {model} has no pretrained config to read its input from")
    channels, height, _ = cfg.input_size
    kwargs = {"img_size": size} if size is not None and cfg.fixed_input_size else {}
    mean, std = tuple(cfg.mean), tuple(cfg.std)
    if len(mean) != channels or len(std) != channels:  # a config with one value for all
        mean, std = (mean[0],) * channels, (std[0],) * channels
    inp = {"size": size or int(height), "channels": int(channels), "mean": mean, "std": std}
    return inp, kwargs


def timm_record(arch: str) -> dict[str, Any]:
    """What ``timm:NAME[@SIZE]`` is, measured once on a throw-away body (one blank image).

    Plain values only (names, numbers, lists, dicts), so that a checkpoint's copy is read
    without torch; :func:`alfk_cli.archs.spec_from_record` turns it into the ArchSpec."""
    model, size = timm_name(arch)
    if not timm.is_model(model):
        raise AlfkError(
            f"unknown timm model {model!r} (timm {timm.__version__}); "
            "python -c 'import timm; print(timm.list_models(\"resnet*\"))' lists them"
        )
    inp, kwargs = _input(model, size)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(0)
        body = _create(model, kwargs).eval()
        feature_info: Any = body.feature_info  # timm's FeatureInfo
        info = feature_info.get_dicts()
        names = [str(d["module"]) for d in info]
        points = [
            TapPoint(n, _find(body, n), d.get("hook_type", "forward"), "")
            for n, d in zip(names, info)
        ]
        x = torch.zeros(1, inp["channels"], inp["size"], inp["size"])
        finished = _probe(body, points, x, watch=True)[1]
        points = [TapPoint(p.name, finished.get(p.name, p.path), p.hook, "") for p in points]
        seen = _probe(body, points, x)[0]
    dims = {n: int(d["num_chs"]) for n, d in zip(names, info)}
    missing = [n for n in names if n not in seen]
    if missing:
        raise AlfkError(f"cannot tap timm model {model}: {missing[0]} never ran")
    shapes = {n: tuple(t.shape) for n, (t, _) in seen.items()}
    presets, default = _presets(names, dims)
    return {
        "source": "timm",
        "timm_version": timm.__version__,
        "model": model,
        "kwargs": kwargs,
        "input": inp,
        "taps": names,
        "modules": {p.name: p.path for p in points},
        "hooks": {p.name: p.hook for p in points},
        "layouts": {n: _layout(shapes[n], dims[n], f"{model} {n}") for n in names},
        # a tap the model still changes in place afterwards (in a function, not a module)
        "copies": {n: seen[n][0]._version != seen[n][1] for n in names},
        "dims": dims,
        "presets": presets,
        "default_preset": default,
        "train_defaults": dict(TRAIN_DEFAULTS),
    }


def _probe(
    body: nn.Module, points: list[TapPoint], x: torch.Tensor, watch: bool = False
) -> tuple[dict[str, tuple[torch.Tensor, int]], dict[str, str]]:
    """One forward of ``x``: each tap's tensor with its version when caught (a later in-place
    change bumps it), and with ``watch`` the last module that hands on each tap's tensor
    itself: where a module finishes a feature in place (MobileNetV3's stem activation after
    ``bn1``, which feature_info names), that module's output is timm's feature."""
    seen: dict[str, tuple[torch.Tensor, int]] = {}
    finished: dict[str, str] = {}

    def catch(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
        def fn(t: torch.Tensor) -> torch.Tensor:
            seen[name] = (t, t._version)
            return t

        return fn

    def watcher(path: str) -> Callable[..., None]:
        def fn(_m: nn.Module, _inp: Any, out: Any) -> None:
            for name, (t, _) in seen.items():
                if out is t and hooks[name] == "forward":
                    finished[name] = path

        return fn

    hooks = {p.name: p.hook for p in points}
    handles = [_hook(body.get_submodule(p.path), p, catch(p.name)) for p in points]
    if watch:
        handles += [m.register_forward_hook(watcher(n)) for n, m in body.named_modules() if n]
    try:
        body(x)
    finally:
        for h in handles:
            h.remove()
    return seen, finished


def _record(arch: str) -> dict[str, Any]:
    record = get_arch(arch).record
    if record is None:
        raise AlfkError(f"{arch} is not a timm architecture")
    return record


def _network(record: dict[str, Any], body: nn.Module, num_classes: int) -> TimmTapNet:
    points = [
        TapPoint(t, record["modules"][t], record["hooks"][t], record["layouts"][t], copy)
        for t, copy in ((t, bool(record["copies"][t])) for t in record["taps"])
    ]
    width = int(record["dims"][record["taps"][-1]])
    return TimmTapNet(body, points, nn.Linear(width, num_classes))


def build_timm(arch: str, num_classes: int) -> TimmTapNet:
    """A freshly initialised ``timm:NAME`` network with ``num_classes`` outputs."""
    record = _record(arch)
    return _network(record, _create(record["model"], dict(record["kwargs"])), num_classes)


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a local weights file: ``.safetensors``, or a torch file read with
    ``weights_only=True`` (timm's wrappers ``state_dict_ema``, ``state_dict``, ``model``
    unwrapped, a DataParallel ``module.`` prefix dropped)."""
    from alfk_cli.backbones import read_torch_file

    raw: Any
    if path.suffix != ".safetensors":
        raw = read_torch_file(path)
    else:
        from safetensors.torch import load_file

        try:
            raw = load_file(str(path), device="cpu")
        except Exception as exc:  # a truncated or foreign file
            raise AlfkError(f"cannot read {path} ({type(exc).__name__}): not safetensors") from None
    for key in ("state_dict_ema", "model_ema", "state_dict", "model"):
        if isinstance(raw, dict) and isinstance(raw.get(key), dict):
            raw = raw[key]
            break
    if (
        not isinstance(raw, dict)
        or not raw
        or not all(isinstance(v, torch.Tensor) for v in raw.values())
    ):
        raise AlfkError(f"{path} holds no state dict of tensors")
    return {k.removeprefix("module."): v for k, v in raw.items()}


def from_timm_file(path: str | os.PathLike, arch: str) -> Checkpoint:
    """A trunk-only :class:`Checkpoint` (head ``backbone``) of ``arch`` from a weights file."""
    from alfk_cli.checkpoint import Checkpoint, file_sha256

    path = Path(path)
    record = _record(arch)
    state = read_weights(path)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the throw-away classifier must leave the global RNG alone
        net = _network(record, _create(record["model"], dict(record["kwargs"]), state), 1)
    trunk = {k: v for k, v in net.state_dict().items() if not k.startswith("classifier.")}
    return Checkpoint(
        arch=arch,
        classes=[],
        head=HEAD,
        input=get_arch(arch).input,
        state_dict=trunk,
        info={"task": "timm", "source": str(path)},
        path=path,
        sha256=file_sha256(path),
    )


def describe_family() -> str:
    """The ``timm:NAME`` line of ``alfk list architectures``."""
    version = importlib.metadata.version("timm")
    examples = ", ".join(TIMM_PREFIX + e for e in EXAMPLES)
    return (
        f"{TIMM_PREFIX}NAME[@SIZE] — any timm model with features_only (timm {version} lists "
        f"{len(timm.list_models())}), e.g. {examples}"
    )


__all__ = [
    "HEAD",
    "TRAIN_DEFAULTS",
    "TapPoint",
    "TimmTapNet",
    "build_timm",
    "describe_family",
    "from_timm_file",
    "read_weights",
    "timm_record",
]
