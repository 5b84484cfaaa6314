"""The user-facing class of the Poisson factor model, with one new field and a plan of its own."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from poisson_factor_module import PoissonFactor

from cellvi import keys
from cellvi.data import fields, setup_anndata
from cellvi.data._loader import ArrayColumn
from cellvi.model import BaseModel
from cellvi.train import TrainingPlan


@dataclass(frozen=True)
class LogLibraryField(fields.Field):
    """The log total counts of each cell, read from the counts (a new kind of field)."""

    layer: str | None = None
    kind: ClassVar[str] = "test_log_library"

    def check(self, adata):
        fields.check_counts(fields.get_counts(adata, self.layer))

    def column(self, adata):
        totals = np.asarray(fields.get_counts(adata, self.layer).sum(axis=1)).reshape(-1, 1)
        return ArrayColumn(self.key, np.log(np.maximum(totals, 1)).astype(np.float32))


class FactorPlan(TrainingPlan):
    """Its own plan: the loadings learn at a tenth of the encoder's rate."""

    def configure_optimizers(self):
        loadings = [self.module.loadings]
        rest = [p for n, p in self.module.named_parameters() if n != "loadings"]
        opt = self.make_optimizer(rest)
        opt.add_param_group({"params": loadings, "lr": self.lr / 10})
        return [opt]


class PoissonFactorModel(BaseModel):
    """Poisson factor model of raw counts (a test of the open core)."""

    _module_cls = PoissonFactor
    _plan_cls = FactorPlan

    @classmethod
    def setup_anndata(cls, adata, *, batch_key=None, layer=None):
        setup_anndata(adata, [
            fields.CountsField(keys.X, layer=layer),
            fields.CategoricalObsField(keys.BATCH, batch_key),
            LogLibraryField("log_library", layer=layer),
        ])

    def _data_options(self, summary):
        return {"n_input": summary.n_vars, "n_batch": summary.n_batch}

    def get_latent_representation(self):
        import torch

        self.module.eval()
        with torch.inference_mode():
            return np.concatenate([
                self.module.inference(b[keys.X])["qz"].loc.numpy()
                for b in self._batches(None, None, None)
            ])
