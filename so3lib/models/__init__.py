"""Models behind one interface: ``flax.linen.Module(graph) -> per-atom energies (N,)``, looked up by name.

The built-in models (schnet, so3krates, bpnn) are listed by name and imported when first asked for, so a SchNet
never imports e3nn-jax."""

from so3lib.models.registry import ModelConfig, available, config_from_dict, get, hyperparameters, make_config, register

__all__ = ["ModelConfig", "available", "config_from_dict", "get", "hyperparameters", "make_config", "register"]
