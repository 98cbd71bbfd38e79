"""Optimiser: gradient clipping → Adam/AMSGrad with linear warm-up then exponential decay, or reduce-on-plateau."""

from __future__ import annotations

import jax
import optax

from so3lib.training.config import TrainingConfig


def learning_rate_schedule(cfg: TrainingConfig) -> optax.Schedule:
    warm = optax.linear_schedule(cfg.learning_rate * 1e-2, cfg.learning_rate, max(cfg.warmup_steps, 1))
    if cfg.schedule == "exponential":
        after = optax.exponential_decay(cfg.learning_rate, cfg.decay_steps, cfg.decay_rate)
    else:
        after = optax.constant_schedule(cfg.learning_rate)
    return optax.join_schedules([warm, after], [cfg.warmup_steps]) if cfg.warmup_steps else after


def make_optimizer(cfg: TrainingConfig, steps_per_eval: int, freeze_labels=None) -> optax.GradientTransformation:
    """With schedule='plateau' the chain ends in optax.contrib.reduce_on_plateau, fed the training loss
    averaged over one evaluation interval (``steps_per_eval`` updates). ``freeze_labels`` (a tree like the
    parameters of 'trained'/'frozen', see `so3lib.training.finetune.freeze_labels`): the chain acts on the
    trained parameters only (clipping included), the frozen ones get a zero update (`optax.set_to_zero`)."""
    sched = learning_rate_schedule(cfg)
    opt = optax.adam(sched) if cfg.optimizer == "adam" else optax.amsgrad(sched)
    parts = ([optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip else []) + [opt]
    if cfg.schedule == "plateau":
        parts.append(
            optax.contrib.reduce_on_plateau(
                factor=cfg.plateau_factor, patience=cfg.plateau_patience, accumulation_size=max(steps_per_eval, 1)
            )
        )
    chain = optax.chain(*parts)
    if freeze_labels is None:
        return chain
    return optax.multi_transform({"trained": chain, "frozen": optax.set_to_zero()}, freeze_labels)


def plateau_scale(opt_state) -> float:
    """Current reduce-on-plateau factor (1.0 without plateau scheduling). Matched by state type: parameter
    trees inside the optimiser state also hold leaves called 'scale' (LayerNorm)."""
    kind = optax.contrib.ReduceLROnPlateauState
    for s in jax.tree_util.tree_leaves(opt_state, is_leaf=lambda x: isinstance(x, kind)):
        if isinstance(s, kind):
            return float(s.scale)
    return 1.0
