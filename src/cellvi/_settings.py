"""Global settings."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Settings:
    """Package-wide settings, available as ``cellvi.settings``.

    Attributes
    ----------
    seed
        Seed of the parameter initialisation of every new model (models built with the same
        seed on the same data start from the same parameters); ``None`` draws from torch's
        global generator.
    """

    seed: int | None = 0


settings = Settings()
