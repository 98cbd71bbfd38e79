"""Optimiser: gradient clipping → Adam/AMSGrad with a learning-rate schedule, or reduce-on-plateau.

Two kinds of schedule (``TrainingConfig.schedule_over``):

* **steps**: an optax schedule of the step count s: linear warm-up from ``warmup_start_fraction``·η over
  ``warmup_steps`` steps, then ``exponential`` (η·decay_rate^(s/decay_steps)), ``cosine`` or ``linear`` (to
  ``final_lr_fraction``·η at ``decay_steps``) or ``constant``.
* **budget**: the schedule follows the fraction of the run's budget spent,
  p = max(t / (60·max_minutes), s / step budget) ∈ [0, 1] (t: training wall time, summed over resumed sessions),

      η(s, p) = η · w(s) · d(p),   w(s) = a + (1 − a)·min(s / warmup_steps, 1),   a = warmup_start_fraction,
      d(p) = f^p (exponential),  f + (1 − f)·(1 + cos πp)/2 (cosine),  1 − (1 − f)·p (linear),  1 (constant),

  with f = ``final_lr_fraction``: the rate reaches f·η when the budget is spent, whichever budget stops the
  run. The host computes η every ``log_every_steps`` steps (`BudgetSchedule`) and writes it into the
  optimiser state (`set_learning_rate`, optax.inject_hyperparams), where it stays until the next write: a
  checkpoint holds it and t, so a resumed run continues the same curve.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from so3lib.training.config import TrainingConfig

DECAYS = ("exponential", "cosine", "linear")  # the schedules a budget can drive


def budget_driven(cfg: TrainingConfig) -> bool:
    """Whether the learning rate follows the fraction of the budget spent (``schedule_over``: 'auto' means yes
    when a wall-clock budget ``max_minutes`` is set and the schedule decays)."""
    if cfg.schedule_over == "auto":
        return cfg.max_minutes is not None and cfg.schedule in DECAYS
    return cfg.schedule_over == "budget"


def warmup_factor(cfg: TrainingConfig, step: int | float) -> float:
    """w(s) = a + (1 − a)·min(s / warmup_steps, 1) (1 without warm-up)."""
    if not cfg.warmup_steps:
        return 1.0
    a = cfg.warmup_start_fraction
    return a + (1.0 - a) * min(float(step) / cfg.warmup_steps, 1.0)


def decay_factor(cfg: TrainingConfig, progress: float) -> float:
    """d(p) of the budget schedule for p ∈ [0, 1] (clipped)."""
    p, f = min(max(float(progress), 0.0), 1.0), cfg.final_lr_fraction
    if cfg.schedule == "exponential":
        return f**p
    if cfg.schedule == "cosine":
        return f + (1.0 - f) * 0.5 * (1.0 + math.cos(math.pi * p))
    if cfg.schedule == "linear":
        return 1.0 - (1.0 - f) * p
    return 1.0


class BudgetSchedule:
    """The budget-driven learning rate η(s, p) (see the module docstring), computed on the host.

    Args:
        cfg: the training configuration (``learning_rate``, ``max_minutes``, the schedule's fractions).
        budget_steps: the run's step budget (`so3lib.training.loop.step_budget`), None: minutes only.
    """

    def __init__(self, cfg: TrainingConfig, budget_steps: int | None):
        if cfg.max_minutes is None and budget_steps is None:
            raise ValueError("a budget-driven schedule needs a budget: set max_minutes, max_steps or max_epochs")
        self.cfg = cfg
        self.budget_s = 60.0 * cfg.max_minutes if cfg.max_minutes is not None else None
        self.budget_steps = budget_steps

    def progress(self, step: int, elapsed_s: float) -> float:
        """p = max(t / budget_s, s / budget_steps), clipped to [0, 1]."""
        parts = [0.0]
        if self.budget_s is not None:
            parts.append(elapsed_s / self.budget_s)
        if self.budget_steps is not None:
            parts.append(step / self.budget_steps)
        return min(max(parts), 1.0)

    def __call__(self, step: int, elapsed_s: float) -> float:
        """η (same unit as ``learning_rate``) for the update after ``step`` steps and ``elapsed_s`` seconds."""
        cfg = self.cfg
        return cfg.learning_rate * warmup_factor(cfg, step) * decay_factor(cfg, self.progress(step, elapsed_s))


def learning_rate_schedule(cfg: TrainingConfig) -> optax.Schedule:
    """The step-driven schedule (``schedule_over`` steps); for a budget-driven run, its warm-up at full η."""
    lr, a = cfg.learning_rate, cfg.warmup_start_fraction
    warm = optax.linear_schedule(lr * a, lr, max(cfg.warmup_steps, 1))
    if budget_driven(cfg) or cfg.schedule in ("constant", "plateau"):
        after = optax.constant_schedule(lr)
    elif cfg.schedule == "exponential":
        after = optax.exponential_decay(lr, cfg.decay_steps, cfg.decay_rate)
    elif cfg.schedule == "cosine":
        after = optax.cosine_decay_schedule(lr, cfg.decay_steps, alpha=cfg.final_lr_fraction)
    else:  # linear
        after = optax.linear_schedule(lr, lr * cfg.final_lr_fraction, cfg.decay_steps)
    return optax.join_schedules([warm, after], [cfg.warmup_steps]) if cfg.warmup_steps else after


def make_optimizer(cfg: TrainingConfig, steps_per_eval: int, freeze_labels=None) -> optax.GradientTransformation:
    """With schedule='plateau' the chain ends in optax.contrib.reduce_on_plateau, fed the training loss
    averaged over one evaluation interval (``steps_per_eval`` updates). A budget-driven run takes its rate from
    the optimiser state (optax.inject_hyperparams; the loop writes it with `set_learning_rate` before each
    step). ``freeze_labels`` (a tree like the parameters of 'trained'/'frozen', see
    `so3lib.training.finetune.freeze_labels`): the chain acts on the trained parameters only (clipping
    included), the frozen ones get a zero update (`optax.set_to_zero`)."""
    base = optax.adam if cfg.optimizer == "adam" else optax.amsgrad
    if budget_driven(cfg):
        opt = optax.inject_hyperparams(base, hyperparam_dtype=jnp.float32)(
            learning_rate=cfg.learning_rate * warmup_factor(cfg, 0)
        )
    else:
        opt = base(learning_rate_schedule(cfg))
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


_INJECTED = tuple(
    getattr(optax, n) for n in ("InjectHyperparamsState", "InjectStatefulHyperparamsState") if hasattr(optax, n)
)


def _is_injected(x) -> bool:
    return isinstance(x, _INJECTED)


def injected_paths(opt_state: Any) -> list[tuple]:
    """The key paths (jax.tree_util) of the injected-hyperparameter states inside ``opt_state``."""
    flat = jax.tree_util.tree_flatten_with_path(opt_state, is_leaf=_is_injected)[0]
    return [path for path, leaf in flat if _is_injected(leaf)]


def _get(node, key):
    if isinstance(key, jax.tree_util.SequenceKey):
        return node[key.idx]
    if isinstance(key, jax.tree_util.DictKey):
        return node[key.key]
    return getattr(node, key.name)


def _set(node, key, value):
    """A copy of ``node`` (tuple, namedtuple, dict or dataclass) with ``key`` set to ``value``."""
    if isinstance(key, jax.tree_util.SequenceKey):
        items = list(node)
        items[key.idx] = value
        return type(node)(*items) if hasattr(node, "_fields") else type(node)(items)  # namedtuple or tuple/list
    if isinstance(key, jax.tree_util.DictKey):
        return {**node, key.key: value}
    if hasattr(node, "_replace"):
        return node._replace(**{key.name: value})
    return dataclasses.replace(node, **{key.name: value})


def _with_rate(s, learning_rate: float):
    old = s.hyperparams["learning_rate"]
    value = np.asarray(learning_rate, dtype=old.dtype)
    sharding = getattr(old, "sharding", None)
    if sharding is not None and len(sharding.device_set) > 1:  # replicated over a mesh (maybe several processes)
        new = jax.make_array_from_callback((), sharding, lambda _: value)
    else:
        new = jnp.asarray(value)
    return s._replace(hyperparams={**s.hyperparams, "learning_rate": new})


def set_learning_rate(opt_state: Any, learning_rate: float, paths: list[tuple] | None = None) -> Any:
    """``opt_state`` with the injected learning rate of every optimiser inside it set to ``learning_rate`` (its
    dtype and placement kept, so the jitted step is not traced again). ``paths``: `injected_paths` of this
    state's structure, found once by the caller (the training loop: a few µs a step instead of a tree walk)."""
    for path in injected_paths(opt_state) if paths is None else paths:
        nodes = [opt_state]
        for key in path:
            nodes.append(_get(nodes[-1], key))
        value = _with_rate(nodes[-1], learning_rate)
        for node, key in zip(reversed(nodes[:-1]), reversed(path), strict=True):
            value = _set(node, key, value)
        opt_state = value
    return opt_state


def injected_learning_rate(opt_state: Any) -> float | None:
    """The learning rate held in the optimiser state (None: the rate is a schedule of the step)."""
    for s in jax.tree_util.tree_leaves(opt_state, is_leaf=_is_injected):
        if _is_injected(s):
            return float(np.asarray(s.hyperparams["learning_rate"]))
    return None


def plateau_scale(opt_state) -> float:
    """Current reduce-on-plateau factor (1.0 without plateau scheduling). Matched by state type: parameter
    trees inside the optimiser state also hold leaves called 'scale' (LayerNorm)."""
    kind = optax.contrib.ReduceLROnPlateauState
    for s in jax.tree_util.tree_leaves(opt_state, is_leaf=lambda x: isinstance(x, kind)):
        if isinstance(s, kind):
            return float(s.scale)
    return 1.0


def current_learning_rate(cfg: TrainingConfig, step: int, opt_state: Any) -> float:
    """The rate the next update uses, for the metrics: the injected one (budget-driven) or the step schedule's,
    times the plateau factor."""
    injected = injected_learning_rate(opt_state)
    lr = injected if injected is not None else float(learning_rate_schedule(cfg)(step))
    return lr * plateau_scale(opt_state)
