"""What a run carries from step to step: the device state (`TrainState`, a pytree the jitted step donates) and the
host counters (`Progress`, saved as the checkpoint's JSON).

    state = init_state(params, opt.init(params))
    progress = Progress.from_dict(meta)   # meta: a checkpoint's JSON, old or new
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class TrainState:
    """params: the trained parameters; opt_state: the optax state; ema: exponential moving average of the
    parameters (what is validated); best: the EMA parameters of the best validation so far; step: the number of
    updates applied (int32 on the device, drives the EMA warm-up)."""

    params: Any
    opt_state: Any
    ema: Any
    best: Any
    step: jax.Array

    def __getitem__(self, key: str):  # reads written for the dict state (``state["params"]``) keep working
        return getattr(self, key)

    def to_dict(self) -> dict:
        """The tree a checkpoint stores: {"params", "opt_state", "ema", "best", "step"}."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, tree: dict) -> TrainState:
        return cls(**{f.name: tree[f.name] for f in dataclasses.fields(cls)})


def init_state(params, opt_state) -> TrainState:
    """Step 0; EMA and best copies get their own buffers (the step donates the state)."""
    copy = lambda t: jax.tree_util.tree_map(jnp.copy, t)  # noqa: E731
    return TrainState(
        params=params, opt_state=opt_state, ema=copy(params), best=copy(params), step=jnp.zeros((), jnp.int32)
    )


@dataclasses.dataclass
class Progress:
    """Where the run stands, in plain python (JSON in every checkpoint).

    step: updates done; epoch, batch_in_epoch: the next batch to draw (epoch order depends on (seed, epoch) only);
    best_val_loss (eV², eV²/Å²) at best_step (−1: no evaluation yet); bad_evals: evaluations since the best one;
    elapsed_s: training time summed over sessions; stopped: why the run ended (None, "max_steps", "max_minutes",
    "early_stopping"); n_evals: evaluations done; last_good_step: the last step whose training loss was checked
    finite (None: none yet)."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    best_val_loss: float = math.inf
    best_step: int = -1
    bad_evals: int = 0
    elapsed_s: float = 0.0
    stopped: str | None = None
    n_evals: int = 0
    last_good_step: int | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, meta: dict) -> Progress:
        """Reads this class's dicts and the older ``meta`` dicts (no last_good_step: a checkpoint is written only
        after every loss up to its step was checked finite, so it is the checkpoint's step)."""
        known = {f.name for f in dataclasses.fields(cls)}
        p = cls(**{k: v for k, v in meta.items() if k in known})
        p.step, p.epoch, p.batch_in_epoch = int(p.step), int(p.epoch), int(p.batch_in_epoch)
        p.best_step, p.bad_evals, p.n_evals = int(p.best_step), int(p.bad_evals), int(p.n_evals)
        p.best_val_loss, p.elapsed_s = float(p.best_val_loss), float(p.elapsed_s)
        if "last_good_step" not in meta and p.step > 0:
            p.last_good_step = p.step
        return p
