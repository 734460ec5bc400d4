"""pofx: preference optimization in JAX (DPO and the methods that grew out of it).

`import pofx` loads the Flax-free core (losses, log-probs, batching, reference strategies,
perturbations, the train step); models live in `pofx.models` (Flax) and are imported on use.
"""

from pofx import batching
from pofx import gpo
from pofx import logprobs
from pofx import losses
from pofx import perturbations
from pofx import policy
from pofx import references
from pofx import train
from pofx._pair_logps import ListLogps, PairLogps

__version__ = "0.1.0"

__all__ = ["PairLogps", "ListLogps", "batching", "gpo", "logprobs", "losses", "perturbations", "policy",
           "references", "train", "__version__"]
