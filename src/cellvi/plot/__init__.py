"""``cellvi.plot``: the same plotting functions as :mod:`cellvi.pl`."""

from cellvi.pl import *  # noqa: F403
from cellvi.pl import __all__  # noqa: F401
