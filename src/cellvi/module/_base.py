"""What every module returns from ``loss``, and the pieces modules share."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

#: A float32 softmax can underflow to exactly 0, which would make log p(x > 0) = -inf; the
#: expected counts get this floor, far below any real expected count.
RATE_FLOOR = 1e-8


@dataclass
class LossOutput:
    """The loss of one minibatch and the per-cell terms it is made of.

    Attributes
    ----------
    loss
        Scalar objective that the optimiser minimises (KL terms weighted by the warm-up weight).
    reconstruction_loss
        Per-cell negative log-likelihood ``-log p(x | z, l)``, shape ``(cells,)``.
    kl_local
        Per-cell KL divergences by name (``"kl_z"``, ``"kl_l"``, ...), each ``(cells,)``.
    kl_global
        KL of global parameters (a scalar; zero for most models).
    extra
        Anything else a module wants to report (e.g. a classification loss), scalars.
    """

    loss: torch.Tensor
    reconstruction_loss: torch.Tensor
    kl_local: dict[str, torch.Tensor] = field(default_factory=dict)
    kl_global: torch.Tensor | float = 0.0
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def kl_local_sum(self) -> torch.Tensor:
        """Sum of the local KL terms, per cell."""
        total = torch.zeros_like(self.reconstruction_loss)
        for v in self.kl_local.values():
            total = total + v
        return total

    @property
    def negative_elbo(self) -> torch.Tensor:
        """Per-cell ``-ELBO`` with the full KL (no warm-up weight), shape ``(cells,)``."""
        return self.reconstruction_loss + self.kl_local_sum


def covariate_codes(batch_index: torch.Tensor, cat_covs: torch.Tensor | None) -> list:
    """Return the categorical inputs of encoders and decoders: the batch, then each covariate."""
    cats = [batch_index]
    if cat_covs is not None:
        cats += list(cat_covs.split(1, dim=1))
    return cats


def one_hot(index: torch.Tensor, n: int) -> torch.Tensor:
    """One-hot encode integer codes of shape ``(cells, 1)`` or ``(cells,)`` into ``(cells, n)``."""
    return torch.nn.functional.one_hot(index.reshape(-1).long(), n).float()


def row_sums(x: torch.Tensor) -> torch.Tensor:
    """Per-row sums of a dense or sparse CSR ``(cells, genes)`` tensor, shape ``(cells,)``."""
    if x.layout == torch.sparse_csr:
        return torch.segment_reduce(x.values(), "sum", offsets=x.crow_indices())
    return x.sum(dim=-1)
