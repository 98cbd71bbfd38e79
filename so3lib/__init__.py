"""so3lib: interchangeable machine-learned interatomic potentials (SchNet, BPNN, SO3krates) in JAX/Flax.

Pipeline: so3lib.data (readers, splits, energy reference) → so3lib.graph (neighbour lists, padded batches)
→ so3lib.models (registry) → so3lib.potential (energy, forces, stress) → so3lib.training → calculators.
"""
from so3lib import models
from so3lib.calculator import So3libCalculator, load_calculator
from so3lib.data import Dataset, DataError, Structure, read
from so3lib.potential import Potential
from so3lib.training.saving import load_potential

__version__ = "0.1.0"
__all__ = ["models", "So3libCalculator", "load_calculator", "Dataset", "DataError", "Structure", "read", "Potential",
           "load_potential"]
