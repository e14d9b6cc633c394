"""Batched descriptors z, Fisher scores g and logits (docs/algorithm.md §1-2).

One batched forward through ``TapNet.forward_taps`` with the earliest tap cut from the graph as a
grad-requiring leaf, then one ``torch.autograd.grad`` of the cross-entropy **summed** over the
batch with respect to the tap tensors. In eval mode (no dropout, batch-norm with running
statistics) images do not interact, so the gradient of the summed loss with respect to image
``i``'s activations is exactly the gradient of image ``i``'s own loss. Parameters are frozen for
the call, so the backward computes activation gradients only, from the logits down to the first
tap and no further: about the cost of one forward pass over the tapped part of the network.

g is the gradient of the cross-entropy (the loss), taken at the post-ReLU taps: the public
code's choice, which produced the published curves (docs/algorithm.md §2).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from alfk_cli.models.nets import TapNet, pool
from alfk_cli.util.devices import full_precision

LabelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class frozen_eval:
    """Context manager: ``model`` in eval mode with ``requires_grad=False`` on every parameter;
    both are restored on exit, whatever they were."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def __enter__(self) -> torch.nn.Module:
        self.training = self.model.training
        self.params = list(self.model.parameters())
        self.flags = [p.requires_grad for p in self.params]
        self.model.eval()
        for p in self.params:
            p.requires_grad_(False)
        return self.model

    def __exit__(self, *exc) -> None:
        for p, flag in zip(self.params, self.flags):
            p.requires_grad_(flag)
        self.model.train(self.training)


def concat_pooled(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """φ of every tap (global average pooling), concatenated: [B, L]."""
    return torch.cat([pool(t) for t in tensors], dim=1)


def describe_batch(
    model: TapNet,
    x: torch.Tensor,
    taps: Sequence[str],
    labels: torch.Tensor | None = None,
    label_fn: LabelFn | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """z [B, L], g [B, L], logits [B, D] and the labels used for g [B] (int64) of a batch.

    ``x`` is a normalised float batch on the model's device. Give either ``labels`` (true labels)
    or ``label_fn(z, logits) -> labels``, which is called between the forward and the backward
    (how ``yhat`` and ``p_yz`` pseudo-labels are computed without a second forward). Soft labels
    ``[B, D]`` (rows summing to 1) give the expected Fisher score under them: the gradient of the
    cross-entropy is linear in its target. All outputs are detached and stay on ``x``'s device.
    """
    if (labels is None) == (label_fn is None):
        raise ValueError("give exactly one of labels and label_fn")
    if not taps:
        raise ValueError("at least one tap is needed")
    with frozen_eval(model), torch.enable_grad(), full_precision():
        logits, feats = model.forward_taps(x, taps, leaf_first_tap=True)
        z = concat_pooled([f.detach() for f in feats])
        out_logits = logits.detach()
        if label_fn is not None:  # exactly one of labels and label_fn was given
            labels = label_fn(z, out_logits)
        target, labels = _targets(torch.as_tensor(labels).to(logits.device), logits.shape)
        loss = F.cross_entropy(logits.float(), target, reduction="sum")
        grads = torch.autograd.grad(loss, feats)
    g = concat_pooled(grads)
    return z, g, out_logits, labels


def _targets(labels: torch.Tensor, shape: torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
    """(cross-entropy target, int64 labels [B]) from class indices [B] or soft labels [B, D]
    (the recorded label of a soft row is its most likely class, ties to the lower class)."""
    labels = torch.as_tensor(labels)
    n, d = shape
    if labels.is_floating_point() and labels.ndim == 2:
        if labels.shape != shape:
            raise ValueError(f"soft labels of shape {tuple(labels.shape)} for logits {(n, d)}")
        soft = labels.float()
        return soft, soft.argmax(dim=1)
    labels = labels.to(dtype=torch.long).reshape(-1)
    if labels.shape[0] != n:
        raise ValueError(f"{labels.shape[0]} labels for a batch of {n}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= d):
        raise ValueError(
            f"labels must lie in [0, {d}); got {labels.min().item()}..{labels.max().item()}"
        )
    return labels, labels


__all__ = ["LabelFn", "concat_pooled", "describe_batch", "frozen_eval"]
