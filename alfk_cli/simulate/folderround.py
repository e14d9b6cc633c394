"""One simulated round's data for a strategy: the pool's images and the current model.

:class:`FolderRound` is the simulation's :class:`alfk_cli.strategies.registry.RoundData`: every number a
strategy asks for is computed here with the current model from the pool folder's images, held
in memory or decoded batch by batch on demand (``simulate.data.Folder``). Each pass reads its
rows in the same batches either way, so the numbers are the same.

With ``frozen`` tables (``simulate --freeze``, :mod:`alfk_cli.simulate.activations`) the passes start
from the cached outputs of the frozen stages instead of the images and run only the rest of the
network (``freeze.tail_net``, which shares its weights with the model): training, probabilities
and classifier inputs from the boundary, z and g from the cut. The frozen stages are in eval
mode either way, so the numbers are those of the whole network on the images. The Monte-Carlo
passes (MC dropout, the ``mc_*`` estimators) perturb the whole network and read the images.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from alfk_cli.data.decode import model_inputs
from alfk_cli.data.inputspec import InputSpec
from alfk_cli.features.descriptors import concat_pooled
from alfk_cli.features.estimators import Estimator, describe_images, get_estimator
from alfk_cli.features.montecarlo import MCConfig
from alfk_cli.features.pseudolabels import NearestReference
from alfk_cli.models.freeze import tail_net
from alfk_cli.models.nets import TapNet
from alfk_cli.simulate.activations import FrozenTables
from alfk_cli.simulate.data import Folder
from alfk_cli.strategies import baselines
from alfk_cli.strategies.acquisition import Descriptors, Selection
from alfk_cli.strategies.acquisition import select as fk_select
from alfk_cli.strategies.kernels import Kernel
from alfk_cli.train.loops import TrainConfig, predict
from alfk_cli.train.loops import fit as train_fit
from alfk_cli.train.sources import ImageSource

__all__ = [
    "DESCRIBE_BATCH",
    "FolderRound",
    "fit",
    "last_layer_of",
    "logits_of",
    "pooled_features",
]

# The batch sizes of each pass: part of the results (a batch's floating-point sums may depend
# on its size), so they are the same whether images are held or streamed.
DESCRIBE_BATCH = 256
PREDICT_BATCH = 512


def logits_of(model: TapNet, source: ImageSource, device: torch.device) -> torch.Tensor:
    """Eval-mode logits of a source's images (float32, CPU)."""
    return predict(model, source, device, batch_size=PREDICT_BATCH)


def fit(
    model: TapNet,
    train: ImageSource,
    held: ImageSource,
    cfg: TrainConfig,
    device: torch.device,
    transform=None,
) -> tuple[int, float]:
    """``training.fit``; returns (best epoch, its held-out accuracy)."""
    result = train_fit(
        model, train, held, cfg, device=device, description="fit", transform=transform
    )
    return result.best_epoch, result.best_accuracy


@torch.no_grad()
def pooled_features(
    model: TapNet,
    batches: Iterable[torch.Tensor],
    spec: InputSpec | None,
    taps: Sequence[str],
    device: torch.device,
) -> np.ndarray:
    """z (concatenated pooled taps) of uint8 image batches (``spec`` None: of model inputs),
    float32 numpy."""
    model.eval().to(device)
    norm = model_inputs(spec)
    out = []
    for x in batches:
        _, feats = model.forward_taps(norm(x.to(device)), taps)
        out.append(concat_pooled(feats).float().cpu())
    return torch.cat(out).numpy()


@torch.no_grad()
def last_layer_of(
    model: TapNet, batches: Iterable[torch.Tensor], spec: InputSpec | None, device: torch.device
) -> tuple[np.ndarray, np.ndarray]:
    """Eval-mode softmax probabilities and classifier inputs (``model.head`` of the last stage)
    of uint8 image batches (``spec`` None: of model inputs), float32 numpy."""
    model.eval().to(device)
    norm = model_inputs(spec)
    last = (model.stage_names[-1],)
    probs, feats = [], []
    for x in batches:
        _, (h,) = model.forward_taps(norm(x.to(device)), last)
        a = model.head(h)
        probs.append(torch.softmax(model.classifier(a).float(), 1).cpu())
        feats.append(a.float().cpu())
    if not probs:
        return np.empty((0, model.num_classes), np.float32), np.empty((0, 0), np.float32)
    return torch.cat(probs).numpy(), torch.cat(feats).numpy()


@dataclass
class FolderRound:
    """One seed's pool (rows ``keep`` of the pool folder, hidden labels included), the model and
    the options. Rows of the strategy interface index ``keep``."""

    model: TapNet
    spec: InputSpec
    taps: tuple[str, ...]
    dims: list[int]
    val: Folder
    pool: Folder  # the whole pool folder
    keep: np.ndarray  # its rows in this seed's (biased) pool
    pool_y: torch.Tensor  # hidden labels: only the ``true`` estimator reads them
    pool_names: list[str]
    device: torch.device
    mc_samples: int
    num_classes: int
    labelled: np.ndarray
    frozen: FrozenTables | None = None  # cached activations of the frozen stages

    @property
    def available(self) -> np.ndarray:
        return ~self.labelled

    @property
    def n_val(self) -> int:
        return len(self.val)

    @property
    def net(self) -> TapNet:
        """What trains and predicts: the model, or its part after the frozen boundary (fed
        the cached activations; it shares the model's weights)."""
        return self.model if self.frozen is None else tail_net(self.model, self.frozen.boundary)

    def source(self, rows: np.ndarray, hold: bool = False) -> ImageSource:
        """``net``'s inputs for pool rows ``rows``: the images (see ``Folder.source``) or the
        boundary's cached activations."""
        if self.frozen is not None:
            return self.frozen.pool.source(self.frozen.boundary, self.keep[rows])
        return self.pool.source(self.keep[rows], hold)

    def val_source(self) -> ImageSource:
        """``net``'s inputs for the validation images."""
        if self.frozen is not None:
            return self.frozen.val.source(self.frozen.boundary)
        return self.val.source()

    def test_source(self, test: Folder) -> ImageSource:
        """``net``'s inputs for the test images."""
        if self.frozen is not None:
            return self.frozen.test.source(self.frozen.boundary)
        return test.source()

    def _batches(self, rows: np.ndarray, size: int) -> Iterable[torch.Tensor]:
        return self.pool.batches(self.keep[rows], size)

    def _inputs(
        self, part: str, rows: np.ndarray | None, stage: str, method: str | Estimator = "true"
    ) -> tuple[TapNet, Iterable[torch.Tensor], InputSpec | None]:
        """(network, batches of ``DESCRIBE_BATCH``, spec) for rows of the validation folder
        (``part`` "val", rows None) or of the pool: the cached outputs of ``stage`` ("cut" or
        "boundary") and the network after it, or the images and the model (no cache, or an
        estimator that perturbs the images)."""
        folder = self.val if part == "val" else self.pool
        at = None if rows is None else self.keep[rows]
        if self.frozen is None or get_estimator(method).uses_mc:
            return self.model, folder.batches(at, DESCRIBE_BATCH), self.spec
        name = self.frozen.cut if stage == "cut" else self.frozen.boundary
        acts = self.frozen.val if part == "val" else self.frozen.pool
        return tail_net(self.model, name), acts.batches(name, at, DESCRIBE_BATCH), None

    def probs(self, rows: np.ndarray) -> np.ndarray:
        logits = logits_of(self.net, self.source(rows), self.device)
        return torch.softmax(logits, 1).numpy()

    def mc_probs(self, rows: np.ndarray, samples: int, seed: int) -> np.ndarray:
        return baselines.mc_dropout_batches(
            self.model, self._batches(rows, PREDICT_BATCH), len(rows), self.spec, samples, seed,
            self.device,
        )  # fmt: skip

    def features(self) -> np.ndarray:
        net, batches, spec = self._inputs("pool", np.arange(len(self.keep)), "cut")
        return pooled_features(net, batches, spec, self.taps, self.device)

    @property
    def val_labels(self) -> np.ndarray:
        return self.val.y.numpy()

    def last_layer(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        net, batches, spec = self._inputs("pool", rows, "boundary")
        return last_layer_of(net, batches, spec, self.device)

    def validation(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        net, batches, spec = self._inputs("val", None, "boundary")
        probs, feats = last_layer_of(net, batches, spec, self.device)
        return probs, feats, self.val.y.numpy()

    def describe(
        self,
        part: str,
        rows: np.ndarray | None,
        method: str | Estimator,
        labels: torch.Tensor | None = None,
        reference: NearestReference | None = None,
        names: Sequence[str] = (),
        seed: int = 0,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """z, g, logits and the labels g used, for the validation images (``part`` "val") or
        pool rows ``rows``, from the cut's cached activations when there are some (``labels``
        and ``names`` by image)."""
        net, batches, spec = self._inputs(part, rows, "cut", method)
        net.to(self.device)
        mc_cfg = MCConfig(samples=self.mc_samples)
        parts: list[list[torch.Tensor]] = [[], [], [], []]
        s = 0
        for x in batches:
            span = slice(s, s + len(x))
            s += len(x)
            out = describe_images(
                net, x.to(self.device), spec, self.taps, method,
                labels=labels[span].to(self.device) if labels is not None else None,
                reference=reference, names=names[span], seed=seed, mc_cfg=mc_cfg,
            )  # fmt: skip
            for acc, t in zip(parts, out, strict=True):
                acc.append(t.float().cpu() if t.is_floating_point() else t.cpu())
        z, g, lg, used = (torch.cat(p).numpy() for p in parts)
        return z, g, lg, used

    def fisher(
        self, estimator: Estimator, kernel: Kernel, P: int, seed: int, center_rule: str = "kcenter"
    ) -> tuple[Selection, float | None]:
        """Validation described with true labels, the available pool with the estimator."""
        vz, vg, vl, _ = self.describe("val", None, "true", labels=self.val.y)
        avail = np.flatnonzero(self.available)
        hidden = self.pool_y[torch.from_numpy(avail)]
        ref = None
        if estimator.needs_reference:
            ref = NearestReference(vz, self.val.y.numpy(), self.dims)
        names = [self.pool_names[i] for i in avail]
        pz, pg, _, used = self.describe("pool", avail, estimator, hidden, ref, names, seed)
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
