"""so3lib: interchangeable machine-learned interatomic potentials (SchNet, BPNN, SO3krates) in JAX/Flax.

Pipeline: so3lib.data (readers, splits, energy reference) → so3lib.graph (neighbour lists, padded batches)
→ so3lib.models (registry) → so3lib.potential (energy, forces, stress) → so3lib.training → calculators.
The names below load on first use, so ``import so3lib`` does not import jax, flax or e3nn-jax.
"""

from so3lib._lazy import lazy_attributes
from so3lib._version import __version__

_WHERE = {
    "data": "so3lib.data:",
    "graph": "so3lib.graph:",
    "models": "so3lib.models:",
    "training": "so3lib.training:",
    "md": "so3lib.md:",
    "So3libCalculator": "so3lib.calculator",
    "load_calculator": "so3lib.calculator",
    "Dataset": "so3lib.data",
    "DataError": "so3lib.data",
    "Structure": "so3lib.data",
    "read": "so3lib.data",
    "Potential": "so3lib.potential",
    "load_potential": "so3lib.training.saving",
}
__getattr__, __dir__ = lazy_attributes(__name__, _WHERE)
__all__ = ["__version__", *_WHERE]
