"""The training loop: optax, EMA, per-epoch validation, best-model tracking, early stopping, orbax
checkpoints with exact resume, NaN guard, run folder with config, metrics, results and plots.

    results = train(run_config, train_ds, val_ds, test_ds, out_dir="runs/ethanol", resume=False)
"""

from __future__ import annotations

import csv
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import jraph
import numpy as np
import optax
from tqdm.auto import tqdm

from so3lib.data.dataset import Dataset
from so3lib.data.reference import fit_energy_reference
from so3lib.graph.batching import BudgetLadder, GraphLoader
from so3lib.potential import Potential, fit_scale_shift
from so3lib.training.checkpoint import Checkpointer
from so3lib.training.config import DataConfig, RunConfig
from so3lib.training.loss import error_sums, loss_fn, loss_from_sums, loss_sums, metrics_from_sums
from so3lib.training.optim import learning_rate_schedule, make_optimizer, plateau_scale
from so3lib.training.saving import save_potential

log = logging.getLogger("so3lib.train")
METRIC_FIELDS = [
    "step",
    "epoch",
    "time_s",
    "learning_rate",
    "train_loss",
    "val_loss",
    "val_energy_mae_mev",
    "val_energy_rmse_mev",
    "val_energy_mae_per_atom_mev",
    "val_forces_mae_mev_per_a",
    "val_forces_rmse_mev_per_a",
]


class NonFiniteLossError(FloatingPointError):
    pass


def count_parameters(params) -> int:
    return int(sum(np.size(x) for x in jax.tree_util.tree_leaves(params)))


FIT_SAMPLE = 2000  # frames of a streamed training set read to fit scale/shift and model constants


def build_potential(cfg: RunConfig, train_ds) -> Potential:
    """Fit the per-element reference and the scale/shift on the training split (a `Dataset`, or a store's
    `DatasetView`: then the reference uses every frame's stored composition, the rest a sample of frames)."""
    d = cfg.data if cfg.data is not None else DataConfig()  # no DataConfig: lstsq, with the rank check
    ref = fit_energy_reference(
        train_ds,
        method=d.energy_reference,
        isolated_atom_energies_ev=d.isolated_atom_energies_ev if d.energy_reference == "isolated_atoms" else None,
        allow_undetermined=d.allow_undetermined_reference,
    )
    fit_ds, model = train_ds, cfg.model
    if not isinstance(train_ds, Dataset):
        fit_ds = train_ds.sample(FIT_SAMPLE, seed=cfg.training.seed)
        if "species" in type(model).model_fields and model.species is None:
            model = model.replace(species=list(train_ds.species))  # every element, not only the sample's
    scale, shift = fit_scale_shift(fit_ds, ref)
    model = model.fit(fit_ds)
    if model != cfg.model:
        log.info(
            "fitted on the training set: %s",
            {k: v for k, v in model.config_view().items() if v != cfg.model.config_view().get(k)},
        )
    return Potential(model, ref, scale, shift)


def make_loader(
    ds,
    pot: Potential,
    batch_size: int,
    shuffle: bool,
    seed: int,
    name: str,
    mesh=None,
    ladder: BudgetLadder | None = None,
) -> GraphLoader:
    """Loader of a `Dataset` (neighbour lists up front) or a store's `DatasetView` (streamed). With a ``mesh``
    the batches are split over its 'data' axis."""
    where = getattr(ds, "source", None) or ds.meta["source"][0]
    pot.reference.check_species(np.asarray(ds.species), f"{name} set ({where})")
    dtype = np.float64 if pot.model.dtype == "float64" else np.float32
    sharding, n_shards = None, 1
    if mesh is not None:
        from jax.sharding import NamedSharding, PartitionSpec

        sharding, n_shards = NamedSharding(mesh, PartitionSpec("data")), mesh.devices.size
    return GraphLoader(
        ds,
        pot.cutoff,
        batch_size,
        shuffle=shuffle,
        seed=seed,
        dtype=dtype,
        energy_offset=pot.reference.energy(ds),
        triplet_cutoff=pot.model.triplet_cutoff,
        n_shards=n_shards,
        sharding=sharding,
        ladder=ladder,
    )


def data_mesh(n_devices: int):
    """A 1-D `jax.sharding.Mesh` named 'data' over the first ``n_devices`` devices (None for 1)."""
    if n_devices <= 1:
        return None
    devices = jax.devices()
    if len(devices) < n_devices:
        raise ValueError(f"n_devices={n_devices} but JAX sees {len(devices)} device(s): {devices}")
    return jax.sharding.Mesh(np.array(devices[:n_devices]), ("data",))


def make_eval_fn(pot: Potential, stress: bool = False):
    @jax.jit
    def eval_batch(params, graph):
        pred = pot(params, graph, compute_stress=stress)
        return error_sums(pred, graph), pred

    return eval_batch


def evaluate(pot: Potential, params, loader: GraphLoader, eval_fn=None, collect: bool = False) -> dict:
    """MAE/RMSE over a loader (eV, eV/Å). With ``collect`` also the predictions for parity plots."""
    eval_fn = eval_fn or make_eval_fn(pot)
    sums, coll = None, {"e_ref": [], "e_pred": [], "f_ref": [], "f_pred": [], "n_atoms": []}
    for g in loader.epoch(0):
        s, pred = eval_fn(params, g)
        sums = s if sums is None else jax.tree_util.tree_map(jnp.add, sums, s)
        if collect:
            gm = np.asarray(jraph.get_graph_padding_mask(g)) & (np.asarray(g.globals["has_energy"]) > 0)
            nm = np.asarray(jraph.get_node_padding_mask(g))
            coll["e_ref"].append(np.asarray(g.globals["energy_residual"])[gm])
            coll["e_pred"].append(np.asarray(pred["energy_residual"])[gm])
            coll["n_atoms"].append(np.asarray(g.n_node)[gm])
            coll["f_ref"].append(np.asarray(g.nodes["forces"])[nm])
            coll["f_pred"].append(np.asarray(pred["forces"])[nm])
    out = metrics_from_sums(jax.tree_util.tree_map(float, sums))
    out["mse_energy"] = out["energy_rmse_ev"] ** 2
    out["mse_forces"] = out["forces_rmse_ev_per_a"] ** 2
    if collect:
        out["predictions"] = {k: np.concatenate(v) for k, v in coll.items()}
    return out


def _ms(m: dict, prefix: str = "val_") -> dict:
    return {
        f"{prefix}energy_mae_mev": 1e3 * m["energy_mae_ev"],
        f"{prefix}energy_rmse_mev": 1e3 * m["energy_rmse_ev"],
        f"{prefix}energy_mae_per_atom_mev": 1e3 * m["energy_mae_per_atom_ev"],
        f"{prefix}forces_mae_mev_per_a": 1e3 * m["forces_mae_ev_per_a"],
        f"{prefix}forces_rmse_mev_per_a": 1e3 * m["forces_rmse_ev_per_a"],
    }


def init_state(params, opt_state) -> dict:
    """Training state; EMA and best copies get their own buffers (the step donates the state)."""
    copy = lambda t: jax.tree_util.tree_map(jnp.copy, t)  # noqa: E731
    return {
        "params": params,
        "opt_state": opt_state,
        "ema": copy(params),
        "best": copy(params),
        "step": jnp.zeros((), jnp.int32),
    }


def make_train_step(
    pot: Potential,
    opt: optax.GradientTransformation,
    beta: float,
    stress_weight: float = 0.0,
    ema_decay: float | None = 0.99,
    sharded: bool = False,
):
    """Jitted ``(state, graph) -> (state, loss, aux)``: loss and gradient, optax update (the loss is passed as
    ``value`` for reduce-on-plateau), EMA of the parameters. The state buffers are donated.

    ``sharded``: the graph is a stack of sub-batches (D, ...) laid out over a mesh's 'data' axis (see
    `GraphLoader` with ``n_shards``); each device evaluates its sub-batch (vmap, partitioned by XLA) and the
    loss is formed from the summed squared errors and counts, so it equals the loss of the whole global batch
    on one device; the gradient all-reduce is inserted by the compiler. Parameters stay replicated."""
    use_stress = stress_weight > 0

    def train_step(state, graph):
        def lf(p):
            if sharded:
                sums = jax.vmap(lambda g: loss_sums(pot(p, g, compute_stress=use_stress), g, use_stress))(graph)
                return loss_from_sums(jax.tree_util.tree_map(lambda x: jnp.sum(x, axis=0), sums), beta, stress_weight)
            return loss_fn(pot(p, graph, compute_stress=use_stress), graph, beta, stress_weight)

        (loss, aux), grads = jax.value_and_grad(lf, has_aux=True)(state["params"])
        updates, opt_state = opt.update(grads, state["opt_state"], state["params"], value=loss)
        params = optax.apply_updates(state["params"], updates)
        step = state["step"] + 1
        if ema_decay:
            d = jnp.minimum(ema_decay, (1.0 + step) / (10.0 + step)).astype(jnp.float32)
            ema = jax.tree_util.tree_map(lambda e, p: (d * e + (1 - d) * p).astype(p.dtype), state["ema"], params)
        else:
            ema = params
        return {**state, "params": params, "opt_state": opt_state, "ema": ema, "step": step}, loss, aux

    return jax.jit(train_step, donate_argnums=0)


def train(
    cfg: RunConfig,
    train_ds: Dataset,
    val_ds: Dataset,
    test_ds: Dataset | None = None,
    out_dir: str | Path = "runs/run",
    resume: bool = False,
    progress: bool = True,
    splits: dict | None = None,
) -> dict[str, Any]:
    """Train ``cfg.model`` on ``train_ds``, validate on ``val_ds`` (EMA parameters), test the best model on
    ``test_ds``. Writes config.yaml, metrics.csv, checkpoints/, model/, results.json, plots/*.png, train.log."""
    t_setup = time.perf_counter()
    out = Path(out_dir)
    ckpt_dir = out / "checkpoints"
    if out.exists() and (ckpt_dir.exists() and any(ckpt_dir.iterdir())) and not resume:
        raise FileExistsError(
            f"{out} already holds a run: pass resume=True (--resume) to continue it, or choose another output folder"
        )
    (out / "plots").mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(out / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("so3lib")
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        return _train(cfg, train_ds, val_ds, test_ds, out, ckpt_dir, resume, progress, splits, t_setup)
    finally:
        root.removeHandler(handler)
        handler.close()


def _train(cfg, train_ds, val_ds, test_ds, out, ckpt_dir, resume, progress, splits, t_setup):
    tc = cfg.training
    pot = build_potential(cfg, train_ds)  # fits the reference, scale/shift and data-dependent model constants
    ref = pot.reference
    cfg = cfg.model_copy(update={"model": pot.model})
    if resume and (out / "config.yaml").exists():
        saved = RunConfig.from_yaml(out / "config.yaml")
        if saved.model.config_view() != pot.model.config_view():
            raise ValueError(
                f"{out}/config.yaml has model {saved.model.config_view()}, the resumed run asks for "
                f"{pot.model.config_view()}: a resumed run must keep its model"
            )
    cfg.to_yaml(out / "config.yaml")
    if splits:
        from so3lib.data.splits import save_splits

        save_splits(out / "splits.npz", splits)

    log.info(
        "energy reference (%s): %s; residual std %.4g meV/atom (raw %.4g meV/atom); scale %.4g eV, shift %.4g eV/atom",
        ref.method,
        dict(zip(ref.species, np.round(ref.energies_ev, 4))),
        1e3 * ref.residual_std_per_atom_ev,
        1e3 * ref.raw_std_per_atom_ev,
        pot.scale,
        pot.shift,
    )
    mesh = data_mesh(tc.n_devices)
    train_loader = make_loader(train_ds, pot, tc.batch_size, True, tc.seed, "training", mesh)
    eval_bs = tc.eval_batch_size or max(tc.batch_size, 64)
    val_loader = make_loader(val_ds, pot, eval_bs, False, 0, "validation")
    steps_per_epoch = len(train_loader)
    steps_per_eval = tc.eval_every_steps or steps_per_epoch
    use_stress = tc.stress_weight > 0

    first = next(val_loader.epoch(0))  # one unsharded batch for the parameter shapes
    params = pot.init(jax.random.PRNGKey(tc.seed), first)
    opt = make_optimizer(tc, steps_per_eval)
    opt_state = opt.init(params)
    state = init_state(params, opt_state)
    meta = {
        "step": 0,
        "epoch": 0,
        "batch_in_epoch": 0,
        "best_val_loss": math.inf,
        "best_step": -1,
        "bad_evals": 0,
        "elapsed_s": 0.0,
        "stopped": None,
        "n_evals": 0,
    }
    ckpt = Checkpointer(ckpt_dir)
    if resume and ckpt.latest_step() is not None:
        state, meta = ckpt.restore(state)
        state = jax.tree_util.tree_map(jnp.asarray, state)
        log.info(
            "resumed from checkpoint at step %d (epoch %d, batch %d)",
            meta["step"],
            meta["epoch"],
            meta["batch_in_epoch"],
        )
        _truncate_metrics(out / "metrics.csv", meta["step"])
    elif not resume and (out / "metrics.csv").exists():
        (out / "metrics.csv").unlink()
    if mesh is not None:  # parameters and optimiser state replicated over the mesh
        from jax.sharding import NamedSharding, PartitionSpec

        state = jax.device_put(state, NamedSharding(mesh, PartitionSpec()))
        log.info(
            "data parallel over %d devices: %s; %d structures per device per step",
            mesh.devices.size,
            list(mesh.devices.flat),
            tc.batch_size // mesh.devices.size,
        )
    n_params = count_parameters(state["params"])
    log.info(
        "model %s: %d parameters; %d training, %d validation structures; %d steps/epoch; padded shapes %s",
        cfg.model.name,
        n_params,
        len(train_ds),
        len(val_ds),
        steps_per_epoch,
        [(r.n_graph, r.n_node, r.n_edge) for r in train_loader.ladder.rungs],
    )

    beta = tc.beta
    train_step = make_train_step(pot, opt, tc.beta, tc.stress_weight, tc.ema_decay, sharded=mesh is not None)
    local = (lambda t: t) if mesh is None else (lambda t: jax.device_put(t, jax.local_devices()[0]))
    eval_fn = make_eval_fn(pot, use_stress)
    lr_sched = learning_rate_schedule(tc)

    step, epoch, bie = int(meta["step"]), int(meta["epoch"]), int(meta["batch_in_epoch"])
    budget_steps = tc.max_steps or (tc.max_epochs * steps_per_epoch if tc.max_epochs else None)
    if tc.max_epochs and tc.max_steps:
        budget_steps = min(tc.max_steps, tc.max_epochs * steps_per_epoch)
    elapsed0 = float(meta["elapsed_s"])
    csv_new = not (out / "metrics.csv").exists()
    csv_fh = open(out / "metrics.csv", "a", newline="")
    writer = csv.DictWriter(csv_fh, fieldnames=METRIC_FIELDS)
    if csv_new:
        writer.writeheader()
    pending: list = []
    loss_window: list[float] = []
    compile_time = None
    t_loop = time.perf_counter()
    step_times_from = None
    steps_timed = 0
    t_other = [0.0]  # evaluation and checkpoint time inside the timed window, excluded from steps_per_s
    # a finished run stays finished (idempotent re-runs); a run stopped by its budget continues if the budget grew
    stop = "early_stopping" if meta["stopped"] == "early_stopping" else None
    if budget_steps is not None and step >= budget_steps:
        stop = stop or "max_steps"
    pbar = tqdm(
        total=budget_steps,
        initial=step,
        desc=f"train {cfg.model.name}",
        disable=not progress,
        dynamic_ncols=True,
        unit="step",
    )

    def flush():
        for s, l_dev in pending:
            val = float(l_dev)
            if not math.isfinite(val):
                raise NonFiniteLossError(
                    f"non-finite training loss ({val}) at step {s} (epoch {epoch}): training stopped. The last good "
                    f"checkpoint is at step {ckpt.latest_step()} in {ckpt_dir}; lower the learning rate or check the "
                    "data"
                )
            loss_window.append(val)
        pending.clear()
        if loss_window:
            pbar.set_postfix(loss=f"{loss_window[-1]:.4g}", refresh=False)

    def do_eval():
        nonlocal stop
        t_eval = time.perf_counter()
        flush()
        m = evaluate(pot, local(state["ema"]), val_loader, eval_fn)
        val_loss = (1 - beta) * m["mse_energy"] + beta * m["mse_forces"]
        meta["n_evals"] += 1
        lr = float(lr_sched(step)) * plateau_scale(state["opt_state"])
        row = {
            "step": step,
            "epoch": epoch,
            "time_s": round(elapsed0 + time.perf_counter() - t_loop, 3),
            "learning_rate": lr,
            "train_loss": float(np.mean(loss_window)) if loss_window else "",
            "val_loss": val_loss,
            **_ms(m),
        }
        writer.writerow(row)
        csv_fh.flush()
        loss_window.clear()
        if val_loss < meta["best_val_loss"]:
            meta.update(best_val_loss=val_loss, best_step=step, bad_evals=0)
            state["best"] = jax.tree_util.tree_map(jnp.copy, state["ema"])
        else:
            meta["bad_evals"] += 1
        log.info(
            "step %d epoch %d: val energy MAE %.3f meV, forces MAE %.3f meV/Å, loss %.4g (best %.4g @ %d), lr %.3g",
            step,
            epoch,
            row["val_energy_mae_mev"],
            row["val_forces_mae_mev_per_a"],
            val_loss,
            meta["best_val_loss"],
            meta["best_step"],
            lr,
        )
        pbar.set_postfix(
            loss=f"{row['train_loss'] or float('nan'):.4g}",
            val_F=f"{row['val_forces_mae_mev_per_a']:.1f}meV/Å",
            refresh=False,
        )
        if tc.early_stopping_patience and meta["bad_evals"] >= tc.early_stopping_patience:
            stop = "early_stopping"
        t_other[0] += time.perf_counter() - t_eval

    def save():
        t_save = time.perf_counter()
        flush()
        meta.update(
            step=step, epoch=epoch, batch_in_epoch=bie, elapsed_s=elapsed0 + time.perf_counter() - t_loop, stopped=stop
        )
        if ckpt.latest_step() == step:  # the final save after a save at the same step
            ckpt.manager.delete(step)
        ckpt.save(step, state, meta)
        t_other[0] += time.perf_counter() - t_save

    try:
        while stop is None:
            for graph in train_loader.epoch(epoch, bie):
                t0 = time.perf_counter()
                state, loss, _ = train_step(state, graph)
                if compile_time is None:
                    jax.block_until_ready(loss)
                    compile_time = time.perf_counter() - t0
                    step_times_from = time.perf_counter()
                else:
                    steps_timed += 1
                step += 1
                bie += 1
                pending.append((step, loss))
                pbar.update(1)
                if step % tc.log_every_steps == 0:
                    flush()
                at_epoch_end = bie == steps_per_epoch
                if (tc.eval_every_steps and step % tc.eval_every_steps == 0) or (
                    not tc.eval_every_steps and at_epoch_end
                ):
                    if at_epoch_end:
                        epoch, bie = epoch + 1, 0
                    do_eval()
                elif at_epoch_end:
                    epoch, bie = epoch + 1, 0
                if budget_steps is not None and step >= budget_steps:
                    stop = stop or "max_steps"
                if tc.max_minutes and elapsed0 + time.perf_counter() - t_loop > 60 * tc.max_minutes:
                    stop = stop or "max_minutes"
                if step % tc.checkpoint_every_steps == 0 or stop:
                    save()
                if stop:
                    break
        flush()
        jax.block_until_ready(state["params"])
        t_end = time.perf_counter()
        if meta["best_step"] < 0:  # no evaluation ran yet: evaluate once so a best model exists
            do_eval()
        save()
    finally:
        pbar.close()
        csv_fh.close()
        ckpt.close()

    train_time = elapsed0 + (t_end - t_loop)
    best = local(state["best"])
    save_potential(out / "model", pot, best)
    results: dict[str, Any] = {
        "model": cfg.model.name,
        "n_parameters": n_params,
        "train_time_s": train_time,
        "steps": step,
        "epochs_completed": epoch,
        "stopped_because": stop,
        "best_step": meta["best_step"],
        "compile_time_s": compile_time,
        "overhead_time_s": None,
        "steps_per_s": (
            steps_timed / max(t_end - step_times_from - t_other[0], 1e-9) if step_times_from and steps_timed else None
        ),
        "n_train": len(train_ds),
        "n_val": len(val_ds),
        "batch_size": tc.batch_size,
        "n_devices": tc.n_devices,
        "streamed": not isinstance(train_ds, Dataset),
        "n_compiles_train_step": _cache_size(train_step),
        "padded_shapes_train": sorted(train_loader.shapes_seen),
        "energy_reference": ref.to_dict(),
        "scale_ev": pot.scale,
        "shift_ev_per_atom": pot.shift,
    }
    if results["steps_per_s"]:
        results["structures_per_s"] = results["steps_per_s"] * tc.batch_size
    val_m = evaluate(pot, best, val_loader, eval_fn)
    results["val"] = {k: v for k, v in val_m.items() if not k.startswith("mse")}
    if isinstance(train_ds, Dataset) and mesh is None:
        train_eval = GraphLoader(
            train_ds,
            pot.cutoff,
            eval_bs,
            shuffle=False,
            table=train_loader.table,
            dtype=train_loader.dtype,
            energy_offset=train_loader.energy_offset,
        )
    else:  # a streamed training set is measured on a sample of up to 5 000 frames
        sub = (
            train_ds
            if isinstance(train_ds, Dataset) or len(train_ds) <= 5000
            else train_ds.subset(np.sort(np.random.default_rng(0).choice(len(train_ds), 5000, replace=False)))
        )
        train_eval = make_loader(sub, pot, eval_bs, False, 0, "training")
    results["train"] = {k: v for k, v in evaluate(pot, best, train_eval, eval_fn).items() if not k.startswith("mse")}
    plots = out / "plots"
    from so3lib import plotting

    plotting.learning_curve(out / "metrics.csv", plots / "learning_curve.png", f"{cfg.name}: {cfg.model.name}")
    if test_ds is not None:
        test_loader = make_loader(test_ds, pot, eval_bs, False, 0, "test")
        tm = evaluate(pot, best, test_loader, eval_fn, collect=True)
        pred = tm.pop("predictions")
        results["test"] = {k: v for k, v in tm.items() if not k.startswith("mse")}
        plotting.parity(
            pred["e_ref"] / pred["n_atoms"],
            pred["e_pred"] / pred["n_atoms"],
            plots / "parity_energy.png",
            "energy per atom (minus reference)",
            "eV/atom",
            f"{cfg.name}: test energies",
        )
        plotting.parity(
            pred["f_ref"],
            pred["f_pred"],
            plots / "parity_forces.png",
            "force component",
            "eV/Å",
            f"{cfg.name}: test forces",
        )
        log.info(
            "test: energy MAE %.3f meV (%.3f meV/atom), forces MAE %.3f meV/Å on %d structures",
            1e3 * tm["energy_mae_ev"],
            1e3 * tm["energy_mae_per_atom_ev"],
            1e3 * tm["forces_mae_ev_per_a"],
            tm["n_structures"],
        )
    results["overhead_time_s"] = time.perf_counter() - t_setup - train_time  # data, neighbour lists, eval, plots
    (out / "results.json").write_text(json.dumps(results, indent=2, default=_json_default))
    return results


def _cache_size(fn) -> int | None:
    try:
        return int(fn._cache_size())
    except Exception:  # private API; absent in some jax versions
        return None


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, (np.ndarray, tuple, set)):
        return list(o)
    return str(o)


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric rows logged after the checkpoint we resume from (they will be logged again)."""
    if not path.exists():
        return
    with open(path) as fh:
        rows = list(csv.DictReader(fh))
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=METRIC_FIELDS)
        w.writeheader()
        for r in rows:
            if int(float(r["step"])) <= step:
                w.writerow({k: r.get(k, "") for k in METRIC_FIELDS})
