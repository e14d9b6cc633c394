"""One simulated round's data for a strategy: the pool held in memory, the current model.

:class:`MemoryRound` is the simulation's :class:`alfk_cli.strategies.RoundData`: every number a
strategy asks for is computed here from uint8 images in memory, with the current model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from alfk_cli import baselines
from alfk_cli.acquisition import Descriptors, Selection
from alfk_cli.acquisition import select as fk_select
from alfk_cli.descriptors import concat_pooled
from alfk_cli.estimators import Estimator, describe_images
from alfk_cli.images import normalizer
from alfk_cli.kernels import Kernel
from alfk_cli.models import InputSpec, TapNet
from alfk_cli.pseudolabels import MCConfig, NearestReference
from alfk_cli.simulate_data import Folder
from alfk_cli.training import ImageSource, TrainConfig, predict
from alfk_cli.training import fit as train_fit

__all__ = [
    "DESCRIBE_BATCH",
    "MemoryRound",
    "fit",
    "last_layer_of",
    "logits_of",
    "pooled_features",
]

DESCRIBE_BATCH = 256


def logits_of(
    model: TapNet, x: torch.Tensor, spec: InputSpec, device: torch.device
) -> torch.Tensor:
    """Eval-mode logits of in-memory uint8 images (float32, CPU)."""
    return predict(
        model, ImageSource.from_tensors(x, torch.zeros(len(x)), spec), device, batch_size=512
    )


def fit(
    model: TapNet,
    x: torch.Tensor,
    y: torch.Tensor,
    held_x: torch.Tensor,
    held_y: torch.Tensor,
    spec: InputSpec,
    cfg: TrainConfig,
    device: torch.device,
    transform=None,
) -> tuple[int, float]:
    """``training.fit`` on in-memory images; returns (best epoch, its held-out accuracy)."""
    result = train_fit(
        model,
        ImageSource.from_tensors(x, y, spec),
        ImageSource.from_tensors(held_x, held_y, spec),
        cfg,
        device=device,
        description="fit",
        transform=transform,
    )
    return result.best_epoch, result.best_accuracy


@torch.no_grad()
def pooled_features(
    model: TapNet, x: torch.Tensor, spec: InputSpec, taps: Sequence[str], device: torch.device
) -> np.ndarray:
    """z (concatenated pooled taps) of uint8 images, float32 numpy."""
    model.eval().to(device)
    norm = normalizer(spec)
    out = []
    for s in range(0, len(x), DESCRIBE_BATCH):
        _, feats = model.forward_taps(norm(x[s : s + DESCRIBE_BATCH].to(device)), taps)
        out.append(concat_pooled(feats).float().cpu())
    return torch.cat(out).numpy()


@torch.no_grad()
def last_layer_of(
    model: TapNet, x: torch.Tensor, spec: InputSpec, device: torch.device
) -> tuple[np.ndarray, np.ndarray]:
    """Eval-mode softmax probabilities and classifier inputs (``model.head`` of the last stage)
    of uint8 images, float32 numpy."""
    model.eval().to(device)
    norm = normalizer(spec)
    last = (model.stage_names[-1],)
    probs, feats = [], []
    for s in range(0, len(x), DESCRIBE_BATCH):
        _, (h,) = model.forward_taps(norm(x[s : s + DESCRIBE_BATCH].to(device)), last)
        a = model.head(h)
        probs.append(torch.softmax(model.classifier(a).float(), 1).cpu())
        feats.append(a.float().cpu())
    if not probs:
        return np.empty((0, model.num_classes), np.float32), np.empty((0, 0), np.float32)
    return torch.cat(probs).numpy(), torch.cat(feats).numpy()


@dataclass
class MemoryRound:
    """The pool of one seed in memory (hidden labels included), the model and the options."""

    model: TapNet
    spec: InputSpec
    taps: tuple[str, ...]
    dims: list[int]
    val: Folder
    pool_x: torch.Tensor  # the (biased) pool of this seed
    pool_y: torch.Tensor  # hidden labels: only the ``true`` estimator reads them
    pool_names: list[str]
    device: torch.device
    mc_samples: int
    num_classes: int
    labelled: np.ndarray

    @property
    def available(self) -> np.ndarray:
        return ~self.labelled

    @property
    def n_val(self) -> int:
        return len(self.val)

    def _images(self, rows: np.ndarray) -> torch.Tensor:
        return self.pool_x[torch.from_numpy(rows)]

    def probs(self, rows: np.ndarray) -> np.ndarray:
        logits = logits_of(self.model, self._images(rows), self.spec, self.device)
        return torch.softmax(logits, 1).numpy()

    def mc_probs(self, rows: np.ndarray, samples: int, seed: int) -> np.ndarray:
        x = self._images(rows)
        return baselines.mc_dropout_probs(self.model, x, self.spec, samples, seed, self.device)

    def features(self) -> np.ndarray:
        return pooled_features(self.model, self.pool_x, self.spec, self.taps, self.device)

    @property
    def val_labels(self) -> np.ndarray:
        return self.val.y.numpy()

    def last_layer(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return last_layer_of(self.model, self._images(rows), self.spec, self.device)

    def validation(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        probs, feats = last_layer_of(self.model, self.val.x, self.spec, self.device)
        return probs, feats, self.val.y.numpy()

    def describe(
        self,
        x: torch.Tensor,
        method: str | Estimator,
        labels: torch.Tensor | None = None,
        reference: NearestReference | None = None,
        names: Sequence[str] = (),
        seed: int = 0,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """z, g, logits and the labels g used, for uint8 images, in batches of 256."""
        self.model.to(self.device)
        mc_cfg = MCConfig(samples=self.mc_samples)
        parts: list[list[torch.Tensor]] = [[], [], [], []]
        for s in range(0, len(x), DESCRIBE_BATCH):
            part = slice(s, s + DESCRIBE_BATCH)
            out = describe_images(
                self.model, x[part].to(self.device), self.spec, self.taps, method,
                labels=labels[part].to(self.device) if labels is not None else None,
                reference=reference, names=names[part], seed=seed, mc_cfg=mc_cfg,
            )  # fmt: skip
            for acc, t in zip(parts, out, strict=True):
                acc.append(t.float().cpu() if t.is_floating_point() else t.cpu())
        z, g, lg, used = (torch.cat(p).numpy() for p in parts)
        return z, g, lg, used

    def fisher(
        self, estimator: Estimator, kernel: Kernel, P: int, seed: int, center_rule: str = "kcenter"
    ) -> tuple[Selection, float | None]:
        """Validation described with true labels, the available pool with the estimator."""
        vz, vg, vl, _ = self.describe(self.val.x, "true", labels=self.val.y)
        avail = np.flatnonzero(self.available)
        hidden = self.pool_y[torch.from_numpy(avail)]
        ref = None
        if estimator.needs_reference:
            ref = NearestReference(vz, self.val.y.numpy(), self.dims)
        names = [self.pool_names[i] for i in avail]
        pz, pg, _, used = self.describe(self._images(avail), estimator, hidden, ref, names, seed)
        pseudo_acc = float((used == hidden.numpy()).mean()) if len(avail) else None
        sel = fk_select(
            Descriptors(vz, vg, self.dims, vl, self.val.y.numpy()),
            Descriptors(pz, pg, self.dims),
            P,
            kernel=kernel,
            seed=seed,
            device="auto" if self.device.type == "cuda" else "cpu",
            center_rule=center_rule,
        )
        return dataclasses.replace(sel, selected=avail[sel.selected].astype(np.int64)), pseudo_acc
