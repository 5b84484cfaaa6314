"""``python -m cellvi.cli``: the ``cellvi`` command (``torchrun`` runs it under ``--nproc``)."""

from . import main

raise SystemExit(main())
