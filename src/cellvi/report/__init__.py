"""Reports of trained models: one self-contained HTML page (``cellvi report RUN_DIR``).

:func:`build_report` returns the page of a run folder (what ``cellvi train`` writes) or of a
saved model folder: the model (class, options, training step, settings), its data (cells,
genes, batches, labels, the filters applied), the training curves, the latent space coloured
by batch and labels with integration scores, SCANVI's predictions, the model's own tables
(LDVAE loadings, AutoZI's zero inflation, totalVI's foreground) and any DE table (``de*.csv``)
in the folder. Pictures are embedded as base64 PNG; nothing is fetched when the page opens.
:func:`write_report` writes it (``report.html``). Needs matplotlib (the ``plot`` extra).
"""

from ._report import ReportError, build_report, write_report

__all__ = ["ReportError", "build_report", "write_report"]
