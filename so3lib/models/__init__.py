"""Models behind one interface: ``flax.linen.Module(graph) -> per-atom energies (N,)``, looked up by name."""
from so3lib.models import bpnn, schnet, so3krates  # noqa: F401  (registers the models)
from so3lib.models.registry import (ModelConfig, available, config_from_dict, get, hyperparameters, make_config,
                                    register)

__all__ = ["ModelConfig", "available", "config_from_dict", "get", "hyperparameters", "make_config", "register"]
