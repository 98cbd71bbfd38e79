"""Model registry and typed configs: validation with clear errors, YAML round trips."""

import pytest

from so3lib import models
from so3lib.training import RunConfig, TrainingConfig


def test_registry_lookup_and_unknown_model():
    assert "schnet" in models.available()
    cfg = models.make_config("schnet", cutoff=4.5, n_atom_basis=32)
    assert cfg.name == "schnet" and cfg.cutoff == 4.5 and cfg.build() is not None
    with pytest.raises(KeyError, match="unknown model 'painn'"):
        models.get("painn")


def test_invalid_options_are_named():
    with pytest.raises(ValueError, match=r"n_atom_basis: Input should be greater than or equal to 1"):
        models.make_config("schnet", n_atom_basis=0)
    with pytest.raises(ValueError, match=r"l_max: Extra inputs are not permitted.*Valid options"):
        models.make_config("schnet", l_max=2)
    with pytest.raises(ValueError, match="cutoff"):
        models.make_config("schnet", cutoff=-1.0)
    with pytest.raises(ValueError, match="rbf"):
        models.make_config("schnet", rbf="chebyshev")


def test_run_config_yaml_round_trip(tmp_path):
    cfg = RunConfig(
        name="x",
        model=models.make_config("schnet", n_interactions=4, rbf="bessel"),
        training=TrainingConfig(max_steps=10, beta=0.9, schedule="plateau"),
    )
    cfg.to_yaml(tmp_path / "c.yaml")
    back = RunConfig.from_yaml(tmp_path / "c.yaml")
    assert back == cfg and back.model.n_interactions == 4 and back.training.schedule == "plateau"
    assert models.config_from_dict(cfg.model.to_dict()) == cfg.model


def test_training_config_validation():
    with pytest.raises(ValueError, match="beta"):
        TrainingConfig(beta=1.5)
    with pytest.raises(ValueError, match="at least one of max_epochs"):
        TrainingConfig(max_epochs=None)
    with pytest.raises(ValueError, match="Extra inputs"):
        TrainingConfig(learning_rat=1e-3)


def test_plateau_scale_reads_the_plateau_state_only():
    import jax.numpy as jnp

    from so3lib.training.optim import make_optimizer, plateau_scale

    params = {"LayerNorm_0": {"scale": jnp.ones(3) * 7.0, "bias": jnp.zeros(3)}}
    for schedule in ("plateau", "exponential"):
        opt = make_optimizer(TrainingConfig(max_steps=1, schedule=schedule), 10)
        assert plateau_scale(opt.init(params)) == 1.0
