"""Pseudo-label estimators S: the label each pool image's Fisher score g is computed with.

Each estimator is one registered :class:`Estimator`; the maths of the built-ins lives in
:mod:`alfk_cli.features.pseudolabels` (docs/algorithm.md §3). ``describe_images`` is the single place that
turns an estimator into a ``describe_batch`` call. A new estimator::

    @register_estimator("zero")
    class Zero(Estimator):
        def labels(self, batch):
            return lambda z, logits: torch.zeros(len(z), dtype=torch.long, device=z.device)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from alfk_cli.errors import AlfkError
from alfk_cli.features.montecarlo import MCConfig
from alfk_cli.util.registry import Registry

if TYPE_CHECKING:
    import torch

    from alfk_cli.data.inputspec import InputSpec
    from alfk_cli.features.pseudolabels import NearestReference
    from alfk_cli.models.nets import TapNet

    #: Labels for a batch: a tensor [B], or a function of (z [B, L], logits [B, D]) -> labels
    #: [B] (or soft labels [B, D], rows summing to 1) evaluated inside the batch's forward pass
    #: (no second forward).
    Labels = torch.Tensor | Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# No torch at import: the registry (names, ``needs_reference``, ``uses_mc``) is read when the
# command line is checked and when a store's configuration is compared, before any model pass;
# the maths (``features.pseudolabels``) is imported by the estimators' ``labels``.

__all__ = [
    "DEFAULT_ESTIMATOR",
    "ESTIMATORS",
    "Estimator",
    "EstimatorBatch",
    "describe_images",
    "get_estimator",
    "register_estimator",
]

# alfk's default (docs/benchmarks.md §4: chosen on validation data); the paper's is "p_yz"
DEFAULT_ESTIMATOR = "p_yz_knn"


@dataclass(frozen=True)
class EstimatorBatch:
    """What an estimator may use for one batch of images."""

    model: TapNet
    images: torch.Tensor  # uint8 [B, C, H, W] on the model's device (spec None: model inputs)
    spec: InputSpec | None
    taps: tuple[str, ...]
    labels: torch.Tensor | None = None  # the images' own labels, when known (simulation)
    reference: NearestReference | None = None  # the labelled validation set's z
    names: Sequence[str] = ()  # relative paths: key per-image random draws
    seed: int = 0
    mc: MCConfig = field(default_factory=MCConfig)


class Estimator:
    """A pseudo-label estimator. ``needs_reference``: it reads the validation store (``p_yz``);
    ``needs_labels``: it reads the images' own labels (``true``); ``uses_mc``: its labels depend
    on the Monte-Carlo settings (they enter the store's configuration fingerprint)."""

    name: str = ""
    needs_reference: bool = False
    needs_labels: bool = False
    uses_mc: bool = False

    def labels(self, batch: EstimatorBatch) -> Labels:
        raise NotImplementedError


ESTIMATORS: Registry[Estimator] = Registry("pseudo-label estimator", "alfk.estimators")


def register_estimator(name: str) -> Callable[[type], type]:
    """Class decorator: register one instance of the decorated :class:`Estimator` as ``name``."""
    return ESTIMATORS.register_instance(name)


def get_estimator(name: str | Estimator) -> Estimator:
    return name if isinstance(name, Estimator) else ESTIMATORS[name]


@register_estimator("true")
class TrueLabels(Estimator):
    """The image's own label (ablation; needs class sub-folders, e.g. in simulation)."""

    needs_labels = True

    def labels(self, batch: EstimatorBatch) -> Labels:
        if batch.labels is None:
            raise AlfkError("the 'true' estimator needs labelled images")
        return batch.labels


@register_estimator("yhat")
class Prediction(Estimator):
    """argmax of the model's logits."""

    def labels(self, batch: EstimatorBatch) -> Labels:
        from alfk_cli.features.pseudolabels import yhat

        return yhat


@register_estimator("p_yz")
class NearestValidation(Estimator):
    """The true label of the validation image nearest by standardised z (the default)."""

    needs_reference = True

    def labels(self, batch: EstimatorBatch) -> Labels:
        if batch.reference is None:
            raise AlfkError("p_yz pseudo-labels need the validation store as a reference")
        return batch.reference


@register_estimator("p_yz_knn")
class SoftNearestValidation(Estimator):
    """Soft labels: each class's share of the ``k`` = 10 validation images nearest by
    standardised z. g is the expected Fisher score under that distribution (the cross-entropy
    gradient is linear in the target); the label recorded is the most common class."""

    needs_reference = True
    k = 10

    def labels(self, batch: EstimatorBatch) -> Labels:
        if batch.reference is None:
            raise AlfkError("p_yz_knn pseudo-labels need the validation store as a reference")
        return batch.reference.soft(self.k)


class _MonteCarlo(Estimator):
    uses_mc = True

    def labels(self, batch: EstimatorBatch) -> Labels:
        from alfk_cli.features.pseudolabels import image_keys, mc_labels

        keys = image_keys(batch.seed, batch.names)
        assert batch.spec is not None, "Monte-Carlo labels perturb images, not activations"
        return mc_labels(
            self.name, batch.model, batch.images, batch.spec, batch.taps, keys, batch.mc
        )


@register_estimator("mc_trace")
class MCTrace(_MonteCarlo):
    """argmax_d of tr C_zs(d) over K perturbed copies."""


@register_estimator("mc_mi")
class MCMutualInformation(_MonteCarlo):
    """argmin_d (by default) of the Gaussian mutual information of z and s(d)."""


def describe_images(
    model: TapNet,
    images: torch.Tensor,
    spec: InputSpec | None,
    taps: Sequence[str],
    method: str | Estimator,
    labels: torch.Tensor | None = None,
    reference: NearestReference | None = None,
    names: Sequence[str] = (),
    seed: int = 0,
    mc_cfg: MCConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """z, g, logits and the labels g used, for one uint8 batch, with the estimator ``method``.

    With ``spec`` None the batch holds model inputs already (a frozen backbone's cached
    activations, ``model`` the network after them): only estimators that do not perturb the
    images (no ``uses_mc``) take them."""
    import torch

    from alfk_cli.data.decode import model_inputs
    from alfk_cli.features.descriptors import describe_batch

    batch = EstimatorBatch(
        model, images, spec, tuple(taps), labels, reference, names, seed, mc_cfg or MCConfig()
    )
    how = get_estimator(method).labels(batch)
    x = model_inputs(spec)(images)
    if isinstance(how, torch.Tensor):
        return describe_batch(model, x, taps, labels=how)
    return describe_batch(model, x, taps, label_fn=how)
