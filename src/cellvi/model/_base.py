"""What every user-facing model shares: set-up, training, save/load, printing.

A model is a module class (``_module_cls``), the fields it reads (declared by its
``setup_anndata``), and a training plan class (``_plan_cls``). The module's options come from
its config (:mod:`cellvi.module._config`): the model fills in those that follow from the data
(:meth:`BaseModel._data_options`) and passes the user's options through, so the signature of a
model class is derived from its module's config and no option is listed twice.
"""

from __future__ import annotations

import inspect
import os
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import pandas as pd
import torch
from anndata import AnnData
from torch import nn

import cellvi
from cellvi import _native, keys
from cellvi._checks import check_fraction, check_int, check_seed
from cellvi._settings import current as current_settings
from cellvi._settings import snapshot_settings
from cellvi.data._backed import ChunkedLoader
from cellvi.data._loader import (
    CellData,
    Loader,
    check_genes,
    check_placement,
    iterate,
    place_data,
    sparse_batches,
)
from cellvi.data._setup import (
    DataSummary,
    check_counts,
    check_nonempty_cells,
    data_fingerprint,
    describe_change,
    get_counts,
    get_summary,
    setup_anndata,
    standard_fields,
)
from cellvi.data.fields import categories_of
from cellvi.module._config import ConfiguredModule, config_signature
from cellvi.train import TrainingPlan, fit, resolve_device
from cellvi.train._distributed import (
    all_reduce_gradients,
    average_buffers,
    broadcast_array,
    broadcast_module,
    init_from_env,
    rank_world,
    reduce_totals,
)

ADATA_FILE = "adata.h5ad"

#: Module options that a model sets from the data summary (users do not pass them).
DATA_OPTIONS = ("n_input", "n_batch", "n_labels", "n_continuous_cov", "n_cats_per_cov",
                "use_size_factor_key", "library_log_means", "library_log_vars")


class BaseModel:
    """A module, the AnnData it reads, how it reads it, and how it was trained.

    Subclasses name their module class (``_module_cls``) and may change the training plan
    (``_plan_cls``), the module options taken from the data (:meth:`_data_options`) and the
    plan's defaults (:meth:`_plan_defaults`).

    Attributes
    ----------
    adata
        The AnnData the model was built on.
    summary
        The :class:`~cellvi.data.DataSummary` that says how the AnnData is read.
    module
        The PyTorch module.
    history
        Per-epoch training history (empty before training).
    train_indices, validation_indices
        Cells used for training and validation in the last ``train``.
    train_settings
        How the last ``train`` ran: its options, the device, the training step taken
        (``"training_step"``: ``"fused"`` or ``"autograd (why)"``) and the settings in force.
    """

    _module_cls: ClassVar[type[ConfiguredModule] | None] = None
    _plan_cls: ClassVar[type[TrainingPlan]] = TrainingPlan

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls._module_cls is not None and "__init__" not in cls.__dict__:
            adata = inspect.Parameter("adata", inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                      annotation="AnnData")
            cls.__signature__ = config_signature(cls._module_cls.Config, skip=DATA_OPTIONS,
                                                 first=[adata])

    def __init__(self, adata: AnnData, **options: Any):
        self.summary: DataSummary = get_summary(adata)
        self.adata = adata
        self.init_kwargs = dict(options)
        self._data_cache: CellData | None = None
        self._gene_index_cache: pd.Index | None = None
        config = self._module_config(self.summary, options)
        seed = current_settings().seed
        with torch.random.fork_rng(enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            self.module: nn.Module = self._build_module(config)
        self.module.eval()
        self.history = pd.DataFrame()
        self.train_indices = np.array([], dtype=np.int64)
        self.validation_indices = np.array([], dtype=np.int64)
        self.test_indices = np.array([], dtype=np.int64)
        self.train_settings: dict[str, Any] = {}
        self.device = torch.device("cpu")
        self.is_trained = False
        self._fingerprint = data_fingerprint(adata, self.summary)
        self._validate_data(self._data(adata), adata)

    # --------------------------------------------------------------- to override
    def _data_options(self, summary: DataSummary) -> dict[str, Any]:
        """Return the module options that follow from the data (genes, batches, library...)."""
        return dict(
            n_input=summary.n_vars,
            n_batch=summary.n_batch,
            n_labels=summary.n_labels,
            n_continuous_cov=len(summary.continuous_covariate_keys),
            n_cats_per_cov=summary.n_cats_per_cov,
            use_size_factor_key=summary.size_factor_key is not None,
            library_log_means=summary.library_log_means,
            library_log_vars=summary.library_log_vars,
        )

    def _module_config(self, summary: DataSummary, options: dict[str, Any]):
        given = sorted(set(options) & set(self._data_options(summary)))
        if given:
            raise TypeError(
                f"{type(self).__name__} sets {given} from the data set-up; do not pass "
                f"{'it' if len(given) == 1 else 'them'}."
            )
        return self._module_cls.make_config(**self._data_options(summary), **options)

    def _build_module(self, config) -> nn.Module:
        return self._module_cls(config)

    def _validate_data(self, data: CellData, adata: AnnData) -> None:
        """Model-specific checks of an AnnData (e.g. no empty cells)."""
        if getattr(self.module, "use_observed_lib_size", False):
            check_nonempty_cells(get_counts(adata, self.summary.layer))

    def _plan_defaults(self) -> dict[str, Any]:
        """Default options of the training plan for this model (before the user's)."""
        return {}

    def _plan_extras(self, options: dict[str, Any], **context: Any) -> dict[str, Any]:
        """Options of the plan that the model builds itself (e.g. a labelled-cell sampler).

        May take (pop) the model's own training options out of ``options``; ``context`` holds
        ``batch_size``, ``train_indices``, ``device`` and ``seed``.
        """
        return {}

    def _default_max_epochs(self) -> int:
        """Epochs when ``train`` gets none: ``min(round(20000 / n_cells * 400), 400)``."""
        return int(min(round(20000 / self.adata.n_obs * 400), 400))

    def _loss_options(self) -> dict[str, Any]:
        """Keyword arguments of the module's forward for the likelihood queries."""
        return {}

    # --------------------------------------------------------------- set-up
    @classmethod
    def setup_anndata(
        cls,
        adata: AnnData,
        *,
        layer: str | None = None,
        batch_key: str | None = None,
        labels_key: str | None = None,
        size_factor_key: str | None = None,
        categorical_covariate_keys: list[str] | None = None,
        continuous_covariate_keys: list[str] | None = None,
    ) -> None:
        """Check an AnnData of raw counts and record which fields the model reads.

        Writes ``adata.uns["_cellvi_setup"]``; the data themselves are not changed.

        Parameters
        ----------
        adata
            Cells x genes AnnData of raw counts.
        layer
            Layer holding the raw counts (None: ``adata.X``).
        batch_key
            ``obs`` column of the batch (None: a single batch).
        labels_key
            ``obs`` column of cell labels.
        size_factor_key
            ``obs`` column of size factors that scale the expected counts.
        categorical_covariate_keys
            ``obs`` columns of extra categorical covariates.
        continuous_covariate_keys
            ``obs`` columns of continuous covariates.
        """
        setup_anndata(adata, standard_fields(
            layer=layer, batch_key=batch_key, labels_key=labels_key,
            size_factor_key=size_factor_key,
            categorical_covariate_keys=categorical_covariate_keys,
            continuous_covariate_keys=continuous_covariate_keys,
        ))

    def _data(self, adata: AnnData | None = None, *, unknown_batches: bool = False
              ) -> CellData:
        """Source of ``adata`` (default: the model's own) read through the model's summary.

        ``unknown_batches``: cells of batches the model does not know are read as batch 0,
        for queries that do not use the batch (the latent of a model whose encoder does not
        read it), with a warning; otherwise they raise.
        """
        if adata is None or adata is self.adata:
            self._check_unchanged()
            if self._data_cache is None:
                self._data_cache = CellData(self.adata, self.summary, check=False)
            return self._data_cache
        summary, n_known = self.summary, None
        batch = summary.get(keys.BATCH)
        if (unknown_batches and batch is not None and batch.obs_key is not None
                and batch.obs_key in adata.obs):
            unknown = sorted(set(categories_of(adata, batch.obs_key)) - set(batch.categories))
            if unknown:
                warnings.warn(
                    f"Batches {unknown[:10]} are unknown to the model; its encoder does not read "
                    "the batch, so their latent is computed as any cell's. To decode them, pass "
                    "a known transform_batch, or map them with load_query_data.",
                    UserWarning, stacklevel=4,
                )
                n_known = len(batch.categories)
                summary = summary.with_field(replace(batch, categories=[*batch.categories,
                                                                        *unknown]))
        data = CellData(adata, summary, check=True)
        if n_known is not None:
            codes = data.columns[keys.BATCH].values
            codes[codes >= n_known] = 0
        self._validate_data(data, adata)
        return data

    def _check_unchanged(self) -> None:
        """Refuse to read the model's AnnData if what the model reads changed after set-up."""
        now = data_fingerprint(self.adata, self.summary)
        change = describe_change(self._fingerprint, now, self.summary)
        if change is not None:
            raise ValueError(
                f"The model's AnnData changed after the model was built: {change}. Its answers "
                f"would mix old and new data. Set it up again and build a new model "
                f"(`{type(self).__name__}.setup_anndata(adata, ...)`, then "
                f"`{type(self).__name__}(adata, ...)`), or pass the changed data as "
                "`adata=` to a query of a trained model."
            )

    def validate_adata(self, adata: AnnData | None) -> None:
        """Raise (naming the problem) unless the model can read ``adata`` (None: its own)."""
        self._data(adata)

    # --------------------------------------------------------------- training
    @snapshot_settings
    def train(
        self,
        max_epochs: int | None = None,
        *,
        batch_size: int = 128,
        train_size: float = 0.9,
        device: str = "auto",
        seed: int | None = None,
        progress_bar: bool = True,
        data_placement: Literal["auto", "device", "host"] = "auto",
        check_val_every_n_epoch: int = 1,
        checkpoint_path: str | os.PathLike | None = None,
        resume: bool = False,
        plan_kwargs: dict[str, Any] | None = None,
        validation_size: float | None = None,
        shuffle_set_split: bool = True,
        datasplitter_kwargs: dict[str, Any] | None = None,
        accelerator: str | None = None,
        devices: int | str | list[int] | None = None,
        enable_progress_bar: bool | None = None,
        load_sparse_tensor: bool | None = None,
        logger: Any = None,
        **plan_options: Any,
    ) -> BaseModel:
        """Fit the model on a random train/validation split with the model's training plan.

        Parameters
        ----------
        max_epochs
            Passes over the training cells; default ``min(round(20000 / n_cells * 400), 400)``.
        batch_size
            Cells per minibatch.
        train_size
            Fraction of cells used for training; the rest are validation cells
            (``model.validation_indices``), on which the ELBO is reported every epoch.
        device
            ``"auto"`` (a GPU when there is one), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        seed
            Seeds the split, the minibatch order and the parameters' noise: the same seed gives
            the same model.
        progress_bar
            Show a progress bar with the epoch and the loss.
        data_placement
            Where minibatches are gathered. ``"host"``: on the CPU, from the AnnData's matrix,
            then moved to the device. ``"device"``: the counts (as CSR) and per-cell arrays are
            copied to the device once, and each step gathers its minibatch there (only the
            cell indices travel). ``"auto"``: ``"device"`` on a GPU when the copy takes at most
            a quarter of its free memory, else ``"host"``. Either way the minibatches, and so
            the trained model, are the same.
        check_val_every_n_epoch
            Compute the validation metrics every this many epochs (and after the last).
        checkpoint_path
            Write a checkpoint there after every epoch (the module, the plan's optimizers,
            schedule and early stopping, the random states and the history so far), replacing
            the previous one atomically.
        resume
            Continue from the checkpoint at ``checkpoint_path`` (written by a ``train`` call
            with the same split, i.e. the same ``seed`` and ``train_size``) up to
            ``max_epochs``: the result is the one an uninterrupted run gives.
        plan_kwargs
            Options of the training plan (see below), as a dict.
        validation_size
            Fraction of cells for validation (scvi-tools' name); None: all cells not used for
            training. With ``train_size + validation_size < 1`` the rest (test cells,
            ``model.test_indices``) is used for neither.
        shuffle_set_split
            Draw the split at random (default); False: the first cells train, the next ones
            validate, in the AnnData's order.
        datasplitter_kwargs
            scvi-tools' data-splitter options: ``external_indexing=[train, validation(, test)]``
            (the split as arrays of cell positions), ``drop_last`` (drop a final incomplete
            minibatch); ``shuffle``, ``pin_memory``, ``num_workers`` have no meaning here
            (minibatches are gathered in-process) and are accepted with a warning.
        accelerator, devices
            scvi-tools' device options, mapped onto ``device``: ``accelerator="cpu"``, or
            ``"gpu"``/``"cuda"`` with ``devices`` a GPU number (``devices=1`` or ``"auto"``:
            the first). One device per process; several GPUs train through ``torchrun``.
        enable_progress_bar
            scvi-tools' name for ``progress_bar``.
        load_sparse_tensor, logger
            Lightning-only options with no meaning here (cellvi always keeps minibatches sparse
            where the module reads them so; ``model.history`` is the log): accepted with a
            warning.
        **plan_options
            Options of the training plan (they take priority over ``plan_kwargs``); for the
            unsupervised plan (:class:`cellvi.train.TrainingPlan`): ``lr`` (1e-3),
            ``weight_decay`` (1e-6), ``eps`` (0.01), ``optimizer`` (``"Adam"``),
            ``n_epochs_kl_warmup`` (400), ``n_steps_kl_warmup`` (None), ``reduce_lr_on_plateau``
            (False), ``lr_factor`` (0.6), ``lr_patience`` (30), ``early_stopping`` (False),
            ``early_stopping_patience`` (45), ``early_stopping_monitor``
            (``"elbo_validation"``), ``early_stopping_min_delta`` (0).

        Returns
        -------
        The model itself; ``model.history`` holds the per-epoch ELBO, reconstruction and KL;
        ``model.train_settings["training_step"]`` says which training step ran.
        """
        n = self.adata.n_obs
        if enable_progress_bar is not None:
            progress_bar = enable_progress_bar
        for name, value in (("load_sparse_tensor", load_sparse_tensor), ("logger", logger)):
            if value is not None and value is not False:
                _no_meaning(name)
        plan_options = _drop_lightning_options(plan_options)
        device = _map_device(device, accelerator, devices)
        if seed is None:
            seed = current_settings().seed
        if max_epochs is None:
            max_epochs = self._default_max_epochs()
        max_epochs = check_int("max_epochs", max_epochs, minimum=1)
        batch_size = check_int("batch_size", batch_size, minimum=2)
        train_size = check_fraction("train_size", train_size)
        seed = check_seed("seed", seed)
        check_val_every_n_epoch = check_int("check_val_every_n_epoch", check_val_every_n_epoch,
                                            minimum=1)
        check_placement(data_placement)
        if not isinstance(progress_bar, bool):
            raise ValueError(f"progress_bar must be True or False, got {progress_bar!r}.")
        splitter = dict(datasplitter_kwargs or {})
        split = _split_cells(n, train_size, validation_size, shuffle_set_split, seed,
                             splitter.pop("external_indexing", None))
        drop_last = bool(splitter.pop("drop_last", False))
        for key in list(splitter):
            if key in ("shuffle", "pin_memory", "num_workers", "persistent_workers"):
                _no_meaning(f"datasplitter_kwargs[{key!r}]")
                splitter.pop(key)
        if splitter:
            raise TypeError(f"datasplitter_kwargs has unknown options {sorted(splitter)}; "
                            "cellvi reads external_indexing and drop_last.")
        if len(split[0]) < 2:
            raise ValueError(
                f"Training needs at least 2 training cells (batch normalisation needs two per "
                f"minibatch); {n} cell(s) with train_size={train_size} give {len(split[0])}."
            )
        device = resolve_device(device)
        init_from_env(device)  # under torchrun: join the process group
        if rank_world()[1] > 1:  # every process trains on process 0's split
            split = tuple(broadcast_array(part) for part in split)
        self._data()  # the AnnData is still the one set up (or this raises)
        before = self._snapshot()
        # a seeded run draws from its own copy of torch's generator: the caller's is left as
        # it was (no process-wide side effect)
        cuda = [device.index or 0] if device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=cuda, enabled=seed is not None):
                return self._train(max_epochs, batch_size, train_size, device, seed,
                                   progress_bar, data_placement, check_val_every_n_epoch,
                                   checkpoint_path, resume, plan_kwargs, plan_options, split,
                                   drop_last)
        except Exception as err:
            self._restore(before)
            note = ("The model was restored to its state before this train() call (weights, "
                    "history, split and settings).")
            if hasattr(err, "add_note"):
                err.add_note(note)
            raise

    def _snapshot(self) -> dict[str, Any]:
        """Everything ``train`` changes, to restore after a failure."""
        return {
            "module": {k: v.detach().clone() for k, v in self.module.state_dict().items()},
            "history": self.history, "train_indices": self.train_indices,
            "validation_indices": self.validation_indices,
            "train_settings": dict(self.train_settings), "is_trained": self.is_trained,
            "device": self.device, "module_device": next(self.module.parameters()).device,
        }

    def _restore(self, state: dict[str, Any]) -> None:
        self.module.to(state["module_device"])
        self.module.load_state_dict(state["module"])
        self.module.eval()
        for key in ("history", "train_indices", "validation_indices", "train_settings",
                    "is_trained", "device"):
            setattr(self, key, state[key])

    def _train(self, max_epochs, batch_size, train_size, device, seed, progress_bar,
               data_placement, check_val_every_n_epoch, checkpoint_path, resume, plan_kwargs,
               plan_options, split, drop_last) -> BaseModel:
        train_idx, val_idx, test_idx = split
        mapping = self.train_settings.get("reference_mapping")
        options = {**self._plan_defaults(), **getattr(self, "_query_plan_defaults", {}),
                   **(plan_kwargs or {}), **plan_options}
        rngs = {"loader": np.random.default_rng(seed)}  # every generator a run draws from
        options.update(self._plan_extras(options, batch_size=batch_size, train_indices=train_idx,
                                         device=device, seed=seed, rngs=rngs))
        _check_options(self._plan_cls, options)
        checkpoint = None
        if checkpoint_path is not None:
            checkpoint = Path(checkpoint_path)
            if resume:
                state = read_checkpoint(checkpoint)
                if not (np.array_equal(state["train_indices"], train_idx)
                        and np.array_equal(state["validation_indices"], val_idx)):
                    raise ValueError(
                        f"The checkpoint {checkpoint} was written for another train/validation "
                        "split: resume with the same seed and train_size."
                    )
        elif resume:
            raise ValueError("resume=True needs checkpoint_path= (the checkpoint to resume).")
        if current_settings().memory_allocator == "tuned":
            _native.tune_allocator()  # process-wide: freed step memory is kept for reuse
        source = place_data(self._data(), data_placement, device)
        if seed is not None:
            torch.manual_seed(seed)
        self.train_indices, self.validation_indices = train_idx, val_idx
        self.test_indices = test_idx
        self.device = device
        self.module.to(device)
        rank, world = rank_world()
        plan = self._plan_cls(self.module, **options)
        sparse = sparse_batches(self.module, device)
        rows: list[dict] = []
        if resume:
            self.module.load_state_dict(state["module"])
        if world > 1:
            broadcast_module(self.module)  # every process starts from process 0's parameters
        plan.setup(device=device, sparse=sparse, n_obs_train=len(train_idx),
                   has_validation=len(val_idx) > 0,
                   gradient_hook=all_reduce_gradients if world > 1 else None)
        if resume:
            plan.load_state_dict(state["plan"])
            for name, rng_state in state["rngs"].items():
                rngs[name].bit_generator.state = rng_state
            torch.set_rng_state(state["torch_rng"])
            rows = list(state["history"])
        # the global batch: with N processes each takes batch_size / N cells per step
        step_batch = batch_size if world == 1 else max(2, batch_size // world)
        drop_below = step_batch if drop_last else 3
        shard = (rank, world)
        if getattr(source, "out_of_core", False):  # contiguous chunks read a buffer at a time
            train_loader = ChunkedLoader(source, train_idx, batch_size=step_batch, shuffle=True,
                                         rng=rngs["loader"], drop_last_below=drop_below,
                                         shard=shard, device=device, sparse=sparse)
            val_loader = ChunkedLoader(source, val_idx, batch_size=max(step_batch, 1024),
                                       shuffle=False, shard=shard, equal_shards=False,
                                       device=device, sparse=sparse,
                                       transpose=False) if len(val_idx) else None
        else:
            train_loader = Loader(source, train_idx, batch_size=step_batch, shuffle=True,
                                  rng=rngs["loader"], drop_last_below=drop_below,
                                  device=device, sparse=sparse, shard=shard)
            val_loader = Loader(source, val_idx, batch_size=max(step_batch, 1024),
                                device=device, sparse=sparse, transpose=False, shard=shard,
                                equal_shards=False) if len(val_idx) else None

        def save_checkpoint(row: dict) -> None:
            rows.append(row)
            if rank != 0:  # only process 0 writes
                return
            write_checkpoint(checkpoint, {
                "module": self.module.state_dict(), "plan": plan.state_dict(),
                "rngs": {k: r.bit_generator.state for k, r in rngs.items()},
                "torch_rng": torch.get_rng_state(), "history": rows,
                "train_indices": torch.from_numpy(train_idx),
                "validation_indices": torch.from_numpy(val_idx),
            })

        history = fit(plan, train_loader, val_loader, max_epochs=max_epochs,
                      n_obs_train=len(train_idx), progress_bar=progress_bar and rank == 0,
                      check_val_every_n_epoch=check_val_every_n_epoch,
                      on_epoch_end=save_checkpoint if checkpoint is not None else None,
                      reduce_totals=reduce_totals if world > 1 else None,
                      after_train_epoch=(lambda: average_buffers(self.module))
                      if world > 1 else None)
        interrupted = bool(history.attrs.get("interrupted"))
        if resume and state["history"]:
            before = pd.DataFrame(state["history"]).set_index("epoch")
            history = pd.concat([before, history]) if not history.empty else before
        if not self.history.empty and not history.empty:  # training again continues the history
            history.index = history.index + self.history.index.max() + 1
            history = pd.concat([self.history, history])
        self.history = history
        public = {k: v for k, v in options.items() if _jsonable(v)}
        self.train_settings = {
            "max_epochs": max_epochs, "batch_size": batch_size, "train_size": train_size,
            "seed": seed, "data_placement": data_placement, "device": str(device),
            **public, "training_step": plan.step_path,
            "kept_epoch": (None if plan.early_stopping is None
                           else int(plan.early_stopping.best_epoch)),
            "settings": current_settings().as_dict(),
            "processes": world,
            "out_of_core": bool(getattr(source, "out_of_core", False)),
        }
        if mapping is not None:
            self.train_settings["reference_mapping"] = mapping
        if interrupted:
            self.train_settings["interrupted"] = True
        self.is_trained = True
        return self

    # --------------------------------------------------------------- helpers for queries
    def _indices(self, adata: AnnData | None, indices) -> np.ndarray:
        n = (adata if adata is not None else self.adata).n_obs
        if indices is None:
            return np.arange(n)
        idx = np.asarray(indices)
        if idx.dtype == bool:
            if idx.shape != (n,):
                raise ValueError(
                    f"A boolean mask of indices needs one entry per cell ({n}), got shape "
                    f"{idx.shape}."
                )
            idx = np.flatnonzero(idx)
            if not idx.size:
                raise ValueError("The boolean mask of indices selects no cell.")
            return idx
        if idx.size == 0:
            raise ValueError("indices is empty: pass at least one cell (None: all cells).")
        if idx.ndim != 1:
            raise ValueError(f"indices must be one-dimensional, got shape {idx.shape}.")
        if idx.size and not np.issubdtype(idx.dtype, np.integer):
            raise ValueError(
                f"indices must be integer positions (or a boolean mask), got dtype {idx.dtype}; "
                "for cell names use `np.flatnonzero(adata.obs_names.isin(names))`."
            )
        if idx.size and (idx.min() < -n or idx.max() >= n):
            raise IndexError(f"indices must be in [0, {n}); got {idx.min()}..{idx.max()}.")
        return idx.astype(np.int64) % n

    def _batches(self, adata, indices, batch_size: int | None, *, nonzero: bool = False,
                 unknown_batches: bool = False):
        """Iterate over query minibatches: large and in order.

        By default a batch holds about 2^22 cells x genes values (2,048 cells of 2,000 genes,
        256 of 16,000), so each ``(cells, genes)`` temporary stays near 16 MB whatever the
        number of genes. The non-zero positions are only gathered when a likelihood is
        evaluated (``nonzero``).
        """
        data = self._data(adata, unknown_batches=unknown_batches)
        idx = self._indices(adata, indices)
        if current_settings().memory_allocator == "tuned":
            _native.tune_allocator()  # process-wide: freed memory is kept for reuse
        if batch_size is None:
            batch_size = current_settings().batch_size
        if batch_size is None:
            batch_size = int(np.clip(2**22 // max(data.n_vars, 1), 128, 8192))
        return iterate(data, idx, batch_size=batch_size, device=self.device,
                       nonzero=nonzero, sparse=sparse_batches(self.module, self.device),
                       transpose=False)

    def _obs_names(self, adata: AnnData | None, indices) -> pd.Index:
        adata = adata if adata is not None else self.adata
        if indices is None:
            return adata.obs_names
        return adata.obs_names[self._indices(adata, indices)]

    def _gene_index(self) -> pd.Index:
        """Return the model's genes as a :class:`pandas.Index`, built once (results share it)."""
        if self._gene_index_cache is None:
            self._gene_index_cache = pd.Index(self.summary.var_names)
        return self._gene_index_cache

    # --------------------------------------------------------------- save / load
    def save(self, dir_path: str | os.PathLike, overwrite: bool = False,
             save_anndata: bool = False, *, prefix: str | None = None,
             **anndata_write_kwargs: Any) -> None:
        """Save the model to a folder: ``model.json``, ``model.safetensors`` (and ``adata.h5ad``).

        The weights are stored as tensors (safetensors) and everything else as JSON, so loading
        the folder never runs code from it (see :mod:`cellvi.model._io`). The folder is written
        under a temporary name and swapped into place when complete; an existing folder is
        replaced only if cellvi wrote it (the user's other files in it are kept).

        Parameters
        ----------
        dir_path
            The folder.
        overwrite
            Replace a model folder that exists.
        save_anndata
            Also write the model's AnnData (``adata.h5ad``), so that :meth:`load` needs none.
        prefix
            Prepended to the file names, so that several models share a folder (load them with
            the same ``prefix``).
        **anndata_write_kwargs
            Options of ``AnnData.write_h5ad`` (``compression="gzip"``...).

        Raises
        ------
        FileExistsError
            The folder exists and ``overwrite`` is False; or the path is a file, or a folder
            that cellvi did not write.
        """
        from . import _io

        if rank_world()[0] != 0:  # data-parallel training: only process 0 writes
            return
        state, tensors = self._saved_state()

        prefix = prefix or ""

        def write_adata(folder: Path) -> None:
            if save_anndata:
                self.adata.write_h5ad(folder / f"{prefix}{ADATA_FILE}", **anndata_write_kwargs)

        _io.write_model_folder(dir_path, state, tensors, overwrite=overwrite,
                               write_files=write_adata, prefix=prefix)

    def _saved_state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """Return the JSON part and the tensors of a saved model (override to add more)."""
        import json

        history = self.history.reset_index() if not self.history.empty else self.history
        state = {
            "cellvi_version": cellvi.__version__,
            "model_class": type(self).__name__,
            "init_kwargs": self.init_kwargs,
            "summary": json.loads(self.summary.to_json()),
            "history": {"columns": [str(c) for c in history.columns],
                        "data": history.to_numpy(dtype=object).tolist()},
            "train_indices": self.train_indices.tolist(),
            "validation_indices": self.validation_indices.tolist(),
            "train_settings": self.train_settings,
            "is_trained": self.is_trained,
        }
        try:
            json.dumps(state)
        except TypeError as err:
            raise TypeError(
                f"The model cannot be saved: its options or settings hold a value that is not "
                f"plain data ({err}). Options such as var_activation must be None to save."
            ) from None
        return state, dict(self.module.state_dict())

    @classmethod
    def load(cls, dir_path: str | os.PathLike, adata: AnnData | None = None,
             device: str = "cpu", *, prefix: str | None = None,
             accelerator: str | None = None) -> BaseModel:
        """Load a model saved with :meth:`save`.

        Parameters
        ----------
        dir_path
            The folder written by ``save``.
        adata
            AnnData to attach; it must have the model's genes in the same order, and is set up
            with the saved summary. None: the ``adata.h5ad`` saved with the model.
        device
            Where to put the module (scvi-tools' ``accelerator`` is accepted too).
        prefix
            The ``prefix`` the model was saved with.

        Raises
        ------
        ValueError
            The AnnData's genes differ from the model's (the message names them); the folder
            holds another model class; a damaged, truncated or unknown file (named).
        FileNotFoundError
            No model in the folder, or no AnnData given nor saved.
        """
        import json

        from . import _io

        dir_path = Path(dir_path)
        prefix = prefix or ""
        if accelerator is not None:
            device = _map_device("auto", accelerator, None)
        state, tensors = _io.read_model_folder(dir_path, prefix=prefix)
        if state.get("model_class") != cls.__name__:
            raise ValueError(
                f"{dir_path} holds a {state.get('model_class')} model; load it with "
                f"cellvi.model.{state.get('model_class')}.load."
            )
        summary = DataSummary.from_json(json.dumps(state["summary"]))
        if adata is None:
            if not (dir_path / f"{prefix}{ADATA_FILE}").exists():
                raise FileNotFoundError(
                    f"{dir_path} has no saved AnnData (saved with save_anndata=False); pass "
                    "`adata=` with the model's genes."
                )
            import anndata

            adata = anndata.read_h5ad(dir_path / f"{prefix}{ADATA_FILE}")
        check_genes(adata, summary)
        check_counts(get_counts(adata, summary.layer))
        adata.uns["_cellvi_setup"] = summary.to_json()
        model = cls.__new__(cls)
        BaseModel.__init__(model, adata, **state["init_kwargs"])
        own = model.module.state_dict()
        missing = sorted(set(own) - set(tensors))
        unexpected = sorted(set(tensors) - set(own))
        shapes = [k for k in own if k in tensors and own[k].shape != tensors[k].shape]
        if missing or unexpected or shapes:
            raise ValueError(
                f"{dir_path / _io.WEIGHTS_FILE} does not match the saved options: missing "
                f"{missing[:5]}, unexpected {unexpected[:5]}, other shapes {shapes[:5]}."
            )
        model.module.load_state_dict(tensors)
        hist = state.get("history") or {}
        if hist.get("columns"):
            model.history = pd.DataFrame(hist["data"], columns=hist["columns"])
            if "epoch" in model.history:
                model.history = model.history.set_index("epoch")
        model.train_indices = np.asarray(state["train_indices"], dtype=np.int64)
        model.validation_indices = np.asarray(state["validation_indices"], dtype=np.int64)
        model.train_settings = state["train_settings"]
        model.is_trained = bool(state["is_trained"])
        model.device = resolve_device(device)
        model.module.to(model.device).eval()
        return model

    # --------------------------------------------------------------- reference mapping
    @classmethod
    def prepare_query_anndata(cls, adata: AnnData, reference,
                              return_reference_var_names: bool = False, inplace: bool = True):
        """Give a query the reference's genes (see :mod:`cellvi.model._mapping`)."""
        from ._mapping import prepare_query_anndata

        return prepare_query_anndata(adata, reference,
                                     return_reference_var_names=return_reference_var_names,
                                     inplace=inplace)

    @classmethod
    def load_query_data(cls, adata: AnnData, reference, **options) -> BaseModel:
        """Map a query onto a trained reference (scArches): see :mod:`cellvi.model._mapping`.

        ``options``: ``inplace_subset_query_vars``, ``device`` (or scvi-tools' ``accelerator``),
        ``freeze_dropout``, ``freeze_expression``, ``freeze_decoder_first_layer``,
        ``freeze_batchnorm_encoder``, ``freeze_batchnorm_decoder``, ``freeze_classifier``,
        ``unfrozen``.
        """
        from ._mapping import load_query_data

        accelerator = options.pop("accelerator", None)
        if accelerator is not None:
            options["device"] = _map_device(options.get("device", "auto"), accelerator,
                                            options.pop("devices", None))
        options.pop("devices", None)
        if options.get("device", "cpu") == "auto":
            options["device"] = str(resolve_device("auto"))
        return load_query_data(cls, adata, reference, **options)

    # --------------------------------------------------------------- scvi-tools' helpers
    @property
    def summary_string(self) -> str:
        """The model's one-paragraph description (what ``print(model)`` shows)."""
        return repr(self)

    def view_anndata_setup(self, adata: AnnData | None = None,
                           hide_state_registries: bool = False) -> None:
        """Print what the model reads from an AnnData: each field, where it is, what it holds.

        ``adata``: an AnnData set up for this model (default: the model's own set-up);
        ``hide_state_registries`` leaves out the recorded categories and names.
        """
        summary = self.summary if adata is None else get_summary(adata)
        print(describe_summary(summary, details=not hide_state_registries))

    @classmethod
    def view_setup_args(cls, dir_path: str | os.PathLike, prefix: str | None = None) -> None:
        """Print the model class, options and data set-up saved in ``dir_path``."""
        import json

        from . import _io

        state, _ = _io.read_model_folder(dir_path, prefix=prefix or "")
        summary = DataSummary.from_json(json.dumps(state["summary"]))
        print(f"{state['model_class']} saved by cellvi {state.get('cellvi_version')}\n"
              f"  options: {state.get('init_kwargs')}\n"
              + describe_summary(summary, details=True))

    def to_device(self, device: str | torch.device) -> BaseModel:
        """Move the module to ``device`` (``"cpu"``, ``"cuda"``, ``"cuda:1"``...) for queries."""
        self.device = resolve_device(device)
        self.module.to(self.device)
        return self

    # --------------------------------------------------------------- printing
    def _describe_module(self) -> str:
        return ""

    def __repr__(self) -> str:
        s = self.summary
        lines = [
            f"{type(self).__name__} model on {self.adata.n_obs:,} cells x {s.n_vars:,} genes"
            + (f" ({s.layer!r} layer)" if s.layer else ""),
        ]
        if s.batch_key:
            lines.append(f"  batches: {s.n_batch} from obs[{s.batch_key!r}]")
        if s.labels_key:
            lines.append(f"  labels: {s.n_labels} from obs[{s.labels_key!r}]")
        for k, cats in zip(s.categorical_covariate_keys, s.categorical_covariate_categories):
            lines.append(f"  categorical covariate obs[{k!r}]: {len(cats)} categories")
        if s.continuous_covariate_keys:
            lines.append(f"  continuous covariates: {s.continuous_covariate_keys}")
        described = self._describe_module()
        if described:
            lines.append(f"  {described}")
        if self.is_trained:
            which = "validation" if "elbo_validation" in self.history else "training"
            elbo = self.history[f"elbo_{which}"]
            kept_epoch = self.train_settings.get("kept_epoch")
            if kept_epoch is not None and kept_epoch in elbo.index:
                kept = (f"kept epoch {kept_epoch} (early stopping), {which} ELBO "
                        f"{elbo.loc[kept_epoch]:.2f}")
            else:
                kept = f"final {which} ELBO {elbo.iloc[-1]:.2f}"
            lines.append(
                f"  trained {len(self.history)} epochs on {self.train_settings.get('device')} "
                f"(lr {self.train_settings.get('lr', 1e-3)}, batch size "
                f"{self.train_settings.get('batch_size')}); {kept}"
            )
            if "training_step" in self.train_settings:
                lines.append(f"  training step: {self.train_settings['training_step']}")
        else:
            lines.append("  not trained yet: call model.train()")
        return "\n".join(lines)


def _check_options(plan_cls: type, options: dict[str, Any]) -> None:
    """Raise a ``TypeError`` naming the valid options for an option the plan does not take."""
    valid = set()
    for cls in plan_cls.__mro__:
        if "__init__" in cls.__dict__:
            valid |= {n for n, p in inspect.signature(cls.__init__).parameters.items()
                      if p.kind is p.KEYWORD_ONLY}
    unknown = sorted(set(options) - valid)
    if unknown:
        raise TypeError(
            f"train() got unknown option(s) {unknown}; the options of {plan_cls.__name__} are "
            f"{sorted(valid)} (and train's own: max_epochs, batch_size, train_size, device, seed, "
            "progress_bar, data_placement, check_val_every_n_epoch, plan_kwargs)."
        )


def _jsonable(value: Any) -> bool:
    return value is None or isinstance(value, bool | int | float | str)


CHECKPOINT_VERSION = 1


def write_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write a training checkpoint (tensors and plain values only) atomically to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.save({"cellvi_checkpoint": CHECKPOINT_VERSION, **state}, tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint of :func:`write_checkpoint`; never runs code from the file."""
    if not path.is_file():
        raise FileNotFoundError(f"No checkpoint at {path} to resume from.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"{path} is not a readable cellvi checkpoint ({err}).") from None
    if not isinstance(state, dict) or state.get("cellvi_checkpoint") != CHECKPOINT_VERSION:
        raise ValueError(f"{path} is not a cellvi training checkpoint (version "
                         f"{CHECKPOINT_VERSION}).")
    state["train_indices"] = state["train_indices"].numpy()
    state["validation_indices"] = state["validation_indices"].numpy()
    return state


#: Lightning Trainer options that have no meaning in cellvi: accepted with a warning.
LIGHTNING_ONLY = frozenset({
    "strategy", "num_nodes", "precision", "callbacks", "enable_checkpointing",
    "enable_model_summary", "log_every_n_steps", "num_sanity_val_steps", "deterministic",
    "benchmark", "default_root_dir", "profiler", "limit_train_batches", "limit_val_batches",
    "accumulate_grad_batches", "gradient_clip_val", "gradient_clip_algorithm", "sync_batchnorm",
    "detect_anomaly", "barebones", "fast_dev_run", "max_steps", "min_epochs", "max_time",
    "val_check_interval", "reload_dataloaders_every_n_epochs", "use_distributed_sampler",
    "inference_mode", "datamodule",
})


def _no_meaning(name: str) -> None:
    import warnings

    warnings.warn(f"train(): {name} is a Lightning option with no meaning in cellvi; ignored.",
                  UserWarning, stacklevel=4)


def _drop_lightning_options(options: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in options.items():
        if key in LIGHTNING_ONLY:
            _no_meaning(key)
        else:
            out[key] = value
    return out


def _map_device(device: str, accelerator: str | None, devices) -> str:
    """Return the ``device`` meant by scvi-tools' ``accelerator`` and ``devices``."""
    if accelerator is None and devices in (None, "auto"):
        return device
    if device != "auto":
        raise ValueError("Pass device= or accelerator=/devices=, not both.")
    accelerator = (accelerator or "auto").lower()
    if accelerator not in ("auto", "cpu", "gpu", "cuda", "mps"):
        raise ValueError(f"accelerator must be 'auto', 'cpu', 'gpu', 'cuda' or 'mps', got "
                         f"{accelerator!r}.")
    if isinstance(devices, str) and devices != "auto":
        devices = [int(d) for d in devices.split(",") if d.strip()]
    if isinstance(devices, list | tuple):
        if len(devices) != 1:
            raise ValueError(
                f"devices={devices!r}: cellvi trains on one device per process; for several "
                "GPUs run the script with torchrun --nproc_per_node N."
            )
        index = int(devices[0])
    elif devices in (None, "auto", 1, -1):
        index = None
    else:
        raise ValueError(
            f"devices={devices!r}: cellvi trains on one device per process; for several GPUs "
            "run the script with torchrun --nproc_per_node N."
        )
    if accelerator == "cpu":
        return "cpu"
    if accelerator == "mps":
        return "mps"
    if accelerator == "auto":
        import torch as _torch

        if not _torch.cuda.is_available():
            return "cpu"
    return "cuda" if index is None else f"cuda:{index}"


def _split_cells(n: int, train_size: float, validation_size: float | None,
                 shuffle: bool, seed: int | None, external) -> tuple[np.ndarray, ...]:
    """``(train, validation, test)`` cell positions, sorted; test cells are used by neither."""
    if external is not None:
        parts = [np.sort(np.asarray(p, dtype=np.int64).reshape(-1)) for p in external]
        if len(parts) not in (2, 3):
            raise ValueError("external_indexing must be [train, validation] or [train, "
                             "validation, test] arrays of cell positions.")
        while len(parts) < 3:
            parts.append(np.array([], dtype=np.int64))
        every = np.concatenate(parts)
        if every.size and (every.min() < 0 or every.max() >= n):
            raise ValueError(f"external_indexing has positions outside [0, {n}).")
        if len(np.unique(every)) != every.size:
            raise ValueError("external_indexing's train, validation and test cells overlap.")
        return tuple(parts)
    n_train = int(np.ceil(train_size * n))
    if validation_size is None:
        n_val = n - n_train
    else:
        validation_size = check_fraction("validation_size", validation_size)
        if train_size + validation_size > 1 + 1e-12:
            raise ValueError(f"train_size + validation_size must be <= 1, got "
                             f"{train_size} + {validation_size}.")
        n_val = min(int(np.floor(validation_size * n)), n - n_train)
    order = np.random.default_rng(seed).permutation(n) if shuffle else np.arange(n)
    return (np.sort(order[:n_train]), np.sort(order[n_train:n_train + n_val]),
            np.sort(order[n_train + n_val:]))


def describe_summary(summary: DataSummary, *, details: bool = True) -> str:
    """Return a table of a set-up's fields: key, kind, where it is read, what it recorded."""
    lines = [f"Data set-up: {summary.n_cells:,} cells x {summary.n_vars:,} genes at set-up"]
    for f in summary.fields:
        where = (getattr(f, "where", None) or getattr(f, "obs_key", None)
                 or getattr(f, "obs_keys", None) or getattr(f, "obsm_key", None) or "-")
        line = f"  {f.key:<14} {f.kind:<22} {where}"
        if details:
            if getattr(f, "categories", None) and f.kind in ("categorical_obs", "labels"):
                cats = list(f.categories)
                line += f"  ({len(cats)}: {cats[:8]}{' ...' if len(cats) > 8 else ''})"
            elif getattr(f, "column_names", None):
                line += f"  ({len(f.column_names)} features)"
            elif getattr(f, "log_means", None):
                line += f"  (log means {[round(v, 2) for v in f.log_means][:8]})"
        lines.append(line)
    return "\n".join(lines)
