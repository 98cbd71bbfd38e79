"""One training step, pure and jitted: loss and gradient, optax update, EMA of the parameters.

    θ ← θ + optax_update(∇L(θ)),   ema ← d·ema + (1 − d)·θ  with  d = min(ema_decay, (1 + t)/(10 + t))

where t is the step count after the update (the EMA warms up over the first steps).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import jraph
import optax

from so3lib.potential import Potential
from so3lib.training.loss import loss_fn, loss_from_sums, loss_sums
from so3lib.training.state import TrainState

TrainStep = Callable[[TrainState, jraph.GraphsTuple], tuple[TrainState, jax.Array, dict]]


def make_train_step(
    pot: Potential,
    opt: optax.GradientTransformation,
    beta: float,
    stress_weight: float = 0.0,
    ema_decay: float | None = 0.99,
    sharded: bool = False,
    nll_weight: float = 0.0,
) -> TrainStep:
    """The jitted step ``(state, graph) -> (state, loss, aux)``; the input state's buffers are donated.

    Args:
        pot: the potential whose parameters are trained.
        opt: the optax transformation; the loss is passed to its update as ``value`` (for reduce-on-plateau).
        beta: the force weight β of L = (1 − β)·MSE_E + β·MSE_F (+ stress_weight·MSE_σ), see `loss_from_sums`.
        stress_weight: weight of the stress term (0: stress is not computed).
        ema_decay: the EMA decay; None or 0: the EMA is the parameters themselves.
        sharded: the graph is a stack of sub-batches (D, ...) laid out over a mesh's 'data' axis (`GraphLoader`
            with ``n_shards``): each device evaluates its sub-batch (vmap, partitioned by XLA) and the loss is
            formed from the summed squared errors and counts, so it equals the loss of the whole global batch on
            one device; the compiler inserts the gradient all-reduce. Parameters stay replicated.
        nll_weight: shallow ensembles (`so3lib.shallow_ensemble`): weight of the Gaussian NLL of the heads'
            spread added to the loss (the NLL of the forces too when ``pot.force_spread``).

    Returns:
        ``train_step(state, graph)`` returning the updated `TrainState`, the loss of the batch before the
        update (a device scalar, eV² / eV²/Å²) and the aux dict of its MSE terms (mse_energy, mse_forces[,
        mse_stress]).
    """
    use_stress = stress_weight > 0

    def train_step(state: TrainState, graph: jraph.GraphsTuple):
        def batch_loss(p):
            if sharded:
                sums = jax.vmap(lambda g: loss_sums(pot(p, g, compute_stress=use_stress), g, use_stress))(graph)
                summed = jax.tree_util.tree_map(lambda x: jnp.sum(x, axis=0), sums)
                return loss_from_sums(summed, beta, stress_weight, nll_weight)
            return loss_fn(pot(p, graph, compute_stress=use_stress), graph, beta, stress_weight, nll_weight)

        (loss, aux), grads = jax.value_and_grad(batch_loss, has_aux=True)(state.params)
        updates, opt_state = opt.update(grads, state.opt_state, state.params, value=loss)
        params = optax.apply_updates(state.params, updates)
        step = state.step + 1
        if ema_decay:
            d = jnp.minimum(ema_decay, (1.0 + step) / (10.0 + step)).astype(jnp.float32)
            ema = jax.tree_util.tree_map(lambda e, p: (d * e + (1 - d) * p).astype(p.dtype), state.ema, params)
        else:
            ema = params
        return state.replace(params=params, opt_state=opt_state, ema=ema, step=step), loss, aux

    return jax.jit(train_step, donate_argnums=0)
