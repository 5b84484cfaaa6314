r"""The label part of the semi-supervised modules: a classifier, a class prior and their losses.

Shared by :class:`~cellvi.module.SCANVAE` (classifier on the latent :math:`z_1`) and
:class:`~cellvi.module.VAEC` (classifier on the log counts). For class probabilities
:math:`q(y \mid h)` and the prior :math:`p(y)`:

.. math::

    \mathrm{CE} = -\frac1{|L|} \sum_{n \in L} \log q(y_n \mid h_n), \qquad
    \mathrm{KL}_y = \sum_y q(y \mid h) \big(\log q(y \mid h) - \log p(y)\big),

the first over the labelled cells :math:`L` of a minibatch, the second for an unlabelled cell
(a labelled cell contributes :math:`-\log p(y_n)` instead).

Label codes: ``0 .. n_labels - 1`` are the classes; any other code marks an unlabelled cell.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from ._encoders import Classifier

__all__ = ["LabelHead", "class_prior", "check_groups"]


class LabelHead(nn.Module):
    """Classifier ``q(y | h)``, class prior ``p(y)``, and the losses built on them.

    Parameters
    ----------
    n_input
        Width of the classifier's input ``h``.
    n_labels
        Number of classes.
    classifier_options
        Options of :class:`~cellvi.nn.Classifier` (``n_hidden``, ``n_layers``,
        ``dropout_rate``, ``use_batch_norm``, ``use_layer_norm``).
    y_prior
        Prior class probabilities (normalised; uniform when None).
    labels_groups
        Group of each class: the classifier becomes ``q(g(y) | h) q(y | h, g(y))``, a classifier
        over the groups times a softmax over the classes within the group.
    """

    def __init__(
        self,
        n_input: int,
        n_labels: int,
        classifier_options: dict,
        *,
        y_prior=None,
        labels_groups: Sequence[int] | None = None,
    ):
        super().__init__()
        self.n_labels = n_labels
        self.register_buffer("y_prior", class_prior(y_prior, n_labels))
        options = {k: v for k, v in classifier_options.items() if k not in ("logits", "n_labels")}
        self.classifier = Classifier(n_input, n_labels=n_labels, logits=True, **options)
        self.use_groups = labels_groups is not None
        if self.use_groups:
            groups = check_groups(labels_groups, n_labels)
            n_groups = int(groups.max()) + 1
            self.n_groups = n_groups
            self.register_buffer("labels_groups", groups)
            mask = torch.zeros(n_groups, n_labels, dtype=torch.bool)
            mask[groups, torch.arange(n_labels)] = True
            self.register_buffer("groups_mask", mask)  # (n_groups, n_labels)
            self.classifier_groups = Classifier(n_input, n_labels=n_groups, logits=True,
                                                **options)

    def log_q_y(self, h: torch.Tensor) -> torch.Tensor:
        """Log class probabilities ``log q(y | h)``, ``(cells, n_labels)``."""
        logits = self.classifier(h)  # (cells, n_labels)
        if not self.use_groups:
            return torch.log_softmax(logits, dim=-1)
        log_group = torch.log_softmax(self.classifier_groups(h), dim=-1)  # (cells, n_groups)
        masked = logits.unsqueeze(1).masked_fill(~self.groups_mask, -math.inf)  # (c, g, l)
        group_lse = torch.logsumexp(masked, dim=-1)  # (cells, n_groups)
        g = self.labels_groups
        return logits - group_lse[:, g] + log_group[:, g]

    def codes(self, y: torch.Tensor | None, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(codes, labelled)``: label codes clamped to the classes, and a mask.

        ``y`` is ``(cells, 1)`` or ``(cells,)``; None means every one of the ``n`` cells is
        unlabelled.
        """
        if y is None:
            y = torch.full((n,), self.n_labels, dtype=torch.long, device=device)
        y = y.reshape(-1).long()
        labelled = (y >= 0) & (y < self.n_labels)
        return y.clamp(0, self.n_labels - 1), labelled

    def feed(self, y: torch.Tensor | None, n: int, device, use_labels: bool):
        """Codes and mask of the cells whose label the loss uses: none unless ``use_labels``."""
        if use_labels:
            return self.codes(y, n, device)
        return (torch.zeros(n, dtype=torch.long, device=device),
                torch.zeros(n, dtype=torch.bool, device=device))

    @staticmethod
    def add_classification(out, cross_entropy: torch.Tensor, ratio: float):
        """Add ``ratio`` times the classification loss to a ``LossOutput`` (and report it)."""
        out.loss = out.loss + ratio * cross_entropy
        out.extra["classification_loss"] = cross_entropy.detach()
        return out

    def cross_entropy(self, log_p: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean ``-log q(y | h)`` over the labelled cells (0, with a gradient path, if none)."""
        y = y.reshape(-1).long()
        keep = (y >= 0) & (y < self.n_labels)
        if not bool(keep.any()):
            return log_p.sum() * 0.0
        return nn.functional.nll_loss(log_p[keep], y[keep])

    def kl_y(self, log_qy: torch.Tensor, y: torch.Tensor, labelled: torch.Tensor,
             qy: torch.Tensor | None = None) -> torch.Tensor:
        """``KL(q(y | h) || p(y))`` per unlabelled cell, ``-log p(y)`` per labelled one.

        ``qy``: ``log_qy.exp()``, when the caller has it (one node in the autograd graph).
        """
        log_prior = torch.log(self.y_prior)
        qy = log_qy.exp() if qy is None else qy
        unlabelled = (qy * (log_qy - log_prior)).sum(-1)
        return torch.where(labelled, -log_prior[y], unlabelled)


def class_prior(y_prior, n_labels: int) -> torch.Tensor:
    """Validate and normalise a class prior into a ``(n_labels,)`` float tensor."""
    if y_prior is None:
        return torch.full((n_labels,), 1.0 / n_labels)
    p = torch.as_tensor(np.asarray(y_prior, dtype=np.float32)).reshape(-1)
    if p.numel() != n_labels:
        raise ValueError(f"y_prior has {p.numel()} entries; expected one per class ({n_labels}).")
    if not bool(torch.all(torch.isfinite(p) & (p > 0))):
        raise ValueError("y_prior must be finite and positive for every class.")
    return p / p.sum()


def check_groups(labels_groups, n_labels: int) -> torch.Tensor:
    """Validate the group of each class: ``n_labels`` integers covering ``0 .. n_groups-1``."""
    if labels_groups is None:
        raise ValueError("use_labels_groups=True needs labels_groups (the group of each class).")
    g = np.asarray(labels_groups)
    if g.shape != (n_labels,) or not np.issubdtype(g.dtype, np.integer):
        raise ValueError(
            f"labels_groups must be {n_labels} integers (one group per class), got {g!r}."
        )
    if g.min() < 0 or set(np.unique(g)) != set(range(int(g.max()) + 1)):
        raise ValueError(
            "labels_groups must use every group code 0 .. n_groups - 1 at least once, "
            f"got {sorted(set(g.tolist()))}."
        )
    return torch.as_tensor(g, dtype=torch.long)
