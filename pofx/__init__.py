"""pofx: preference optimization in JAX (DPO and the methods that grew out of it)."""

from pofx import gpo
from pofx import losses
from pofx._pair_logps import ListLogps, PairLogps

__version__ = "0.1.0"

__all__ = ["PairLogps", "ListLogps", "gpo", "losses", "__version__"]
