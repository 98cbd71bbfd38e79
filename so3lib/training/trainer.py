"""Training a potential end to end: fit the potential's constants on the training set, build the loaders, the
state and the step, run `TrainingLoop`, evaluate the best model and write the run folder (config.yaml,
splits.npz, metrics.csv, checkpoints/, model/, results.json, plots/*.png, train.log).

    results = train(run_config, train_ds, val_ds, test_ds, out_dir="runs/ethanol", resume=False)

The parts: `state` (TrainState, Progress), `step` (the jitted step), `evaluation` (errors, validation loss,
metrics.csv), `loop` (only the loop), `checkpoint` (orbax).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from so3lib.data.dataset import Dataset
from so3lib.data.errors import DataError
from so3lib.data.reference import fit_energy_reference
from so3lib.graph.batching import BudgetLadder, GraphLoader
from so3lib.potential import Potential, fit_scale_shift, make_potential
from so3lib.training import distributed, finetune, run_folder
from so3lib.training.checkpoint import Checkpointer, NoCheckpointer
from so3lib.training.config import DataConfig, RunConfig, nll_weight
from so3lib.training.evaluation import METRIC_FIELDS, MetricsCSV, evaluate, fmt, make_eval_fn, to_mev
from so3lib.training.loop import LoopTiming, NonFiniteLossError, TrainingLoop, step_budget
from so3lib.training.optim import BudgetSchedule, budget_driven, current_learning_rate, make_optimizer
from so3lib.training.saving import save_potential
from so3lib.training.state import Progress, TrainState, init_state
from so3lib.training.step import make_train_step

__all__ = [  # the names moved to the parts stay importable from here
    "METRIC_FIELDS",
    "NonFiniteLossError",
    "build_potential",
    "count_parameters",
    "data_mesh",
    "evaluate",
    "init_state",
    "make_eval_fn",
    "make_loader",
    "make_train_step",
    "train",
]
log = logging.getLogger("so3lib.train")


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
    if cfg.training.output_scale_ev is not None:  # chosen by the user instead of the fitted RMS force
        scale = float(cfg.training.output_scale_ev)
    model = model.fit(fit_ds)
    if model != cfg.model:
        log.info(
            "fitted on the training set: %s",
            {k: v for k, v in model.config_view().items() if v != cfg.model.config_view().get(k)},
        )
    return make_potential(model, ref, scale, shift)


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
    cache = None
    if isinstance(ds, Dataset) and getattr(pot.model, "precompute_descriptors", False):  # BPNN: G, ∂G/∂r once
        from so3lib.graph.batching import NeighbourTable
        from so3lib.models.bpnn_cache import cache_for

        table = NeighbourTable.build(ds, pot.cutoff, triplet_cutoff=pot.model.triplet_cutoff)
        cache = cache_for(pot.model, ds, table, dtype)
    return GraphLoader(
        ds,
        pot.cutoff,
        batch_size,
        shuffle=shuffle,
        seed=seed,
        dtype=dtype,
        energy_offset=pot.reference.energy(ds) if isinstance(ds, Dataset) else _offset_of(pot.reference, ds),
        triplet_cutoff=pot.model.triplet_cutoff,
        n_shards=n_shards,
        sharding=sharding,
        ladder=ladder,
        descriptor_cache=cache,
    )


def _offset_of(reference, view):
    """Reference energy of frames of a store's view, computed per batch from their stored composition."""
    return lambda frames: reference.energy(view.subset(frames))


def data_mesh(n_devices: int):
    """A 1-D `jax.sharding.Mesh` named 'data' over the first ``n_devices`` devices (None for 1). In a run of
    several processes it spans every device of every process (each process holds its own devices' shards)."""
    if jax.process_count() > 1 and n_devices != jax.device_count():
        raise ValueError(
            f"n_devices={n_devices} but the {jax.process_count()} processes hold {jax.device_count()} devices in all "
            f"({jax.local_device_count()} on this one): a multi-process run trains on all of them, pass "
            f"--n-devices {jax.device_count()}"
        )
    if n_devices <= 1:
        return None
    devices = jax.devices()
    if len(devices) < n_devices:
        raise ValueError(f"n_devices={n_devices} but JAX sees {len(devices)} device(s): {devices}")
    return jax.sharding.Mesh(np.array(devices[:n_devices]), ("data",))


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
    ``test_ds``. Writes config.yaml, metrics.csv, checkpoints/, model/, results.json, plots/*.png, train.log.

    In a run of several processes (`so3lib.training.distributed`) every process calls this with the same
    arguments; process 0 alone writes ``out_dir`` (the others may not even see it) and returns the results,
    the others return ``{"process_id", "steps", "train_time_s", "input_wait_s", "out": None}``.

    With ``cfg.training.ensemble`` = K, K members (see `so3lib.training.ensemble`)."""
    if cfg.training.ensemble:
        from so3lib.training.ensemble import train_ensemble

        return train_ensemble(cfg, train_ds, val_ds, test_ds, out_dir, resume, progress, splits)
    t_setup = time.perf_counter()
    out = Path(out_dir)
    ckpt_dir = out / "checkpoints"
    with contextlib.ExitStack() as stack:
        with distributed.agreement(f"opening the run folder {out} on process 0"):
            if distributed.is_writer():
                stack.enter_context(run_folder.RunFolder(out).lock())  # refuses foreign files, a second writer
                if (ckpt_dir.exists() and any(ckpt_dir.iterdir())) and not resume:
                    raise FileExistsError(
                        f"{out} already holds a run: pass resume=True (--resume) to continue it, or choose another "
                        "output folder"
                    )
                (out / "plots").mkdir(parents=True, exist_ok=True)
                handler = logging.FileHandler(out / "train.log")
                handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
                root = logging.getLogger("so3lib")
                handler.setLevel(logging.INFO)
                level = root.level
                root.addHandler(handler)
                root.setLevel(min(logging.INFO, level or logging.INFO))  # train.log: INFO; the caller's level returns
                stack.callback(handler.close)
                stack.callback(root.setLevel, level)
                stack.callback(root.removeHandler, handler)
        return _train(cfg, train_ds, val_ds, test_ds, out, ckpt_dir, resume, progress, splits, t_setup)


def _train(cfg, train_ds, val_ds, test_ds, out, ckpt_dir, resume, progress, splits, t_setup):
    tc = cfg.training
    multi, writer = distributed.active(), distributed.is_writer()
    with distributed.agreement("preparing the training"):  # local work only: no collective inside
        _check_splits(train_ds, val_ds, tc)
        if tc.init_from:  # fine-tuning: the run's model, scale and shift; the reference as init_reference says
            pot, init_params, init_summary = finetune.start(cfg, train_ds)
        else:  # fits the reference, scale/shift and data-dependent model constants
            pot, init_params, init_summary = build_potential(cfg, train_ds), None, None
        cfg = cfg.model_copy(update={"model": pot.model})
        for name, ds in (("validation", val_ds), ("test", test_ds)):  # before the first step, not after training
            if ds is not None:
                pot.reference.check_species(np.asarray(ds.species), f"{name} set ({_source(ds)})")
        fingerprint = run_folder.fingerprint(cfg, {"train": train_ds, "val": val_ds, "test": test_ds})
        if tc.init_from:  # the content of the run it starts from, not its path
            fingerprint["config"]["training"].pop("init_from", None)
            fingerprint["init_from"] = finetune.init_fingerprint(tc.init_from)
        if writer:
            if resume:
                run_folder.check_resume(out, fingerprint)  # the same run, or a refusal listing what changed
            run_folder.save_fingerprint(out, fingerprint)
            _write_run_config(cfg, out, resume, splits)
        _log_reference(pot)
        mesh = data_mesh(tc.n_devices)
        train_loader = make_loader(train_ds, pot, tc.batch_size, True, tc.seed, "training", mesh)
        if isinstance(train_ds, Dataset) and int(train_loader.table.offsets[-1]) == 0:
            raise DataError(
                _source(train_ds),
                f"the cutoff {pot.cutoff:g} Å leaves no neighbour pair in any training structure: the model would "
                "see isolated atoms only; raise the cutoff",
            )
        eval_batch_size = tc.eval_batch_size or max(tc.batch_size, 64)
        val_loader = make_loader(val_ds, pot, eval_batch_size, False, 0, "validation")
        steps_per_epoch = len(train_loader)
        steps_per_eval = tc.eval_every_steps or steps_per_epoch

        first = next(val_loader.epoch(0))  # one unsharded batch for the parameter shapes
        params = pot.init(jax.random.PRNGKey(tc.seed), first)
        freeze = None
        if init_params is not None:
            finetune.check_params(pot, init_params, params, tc.init_from)
            params = jax.tree_util.tree_map(lambda t, x: jnp.asarray(x, t.dtype), params, init_params)
            freeze = finetune.freeze_labels(pot.model, params, tc.freeze)
        opt = make_optimizer(tc, steps_per_eval, freeze)
        ckpt = Checkpointer(ckpt_dir, single_writer=multi) if writer else NoCheckpointer(ckpt_dir)
        state = init_state(params, opt.init(params))
        run_progress = Progress()
        if writer:  # process 0 restores; the others receive its state below
            state, run_progress = _start_or_resume(state, ckpt, resume, out / "metrics.csv")
    if multi:  # every process starts from process 0's state (fresh or resumed)
        state = TrainState.from_dict(distributed.broadcast_tree(distributed.to_host(state.to_dict())))
        run_progress = Progress.from_dict(distributed.broadcast_json(run_progress.to_dict()))
    if mesh is not None:  # parameters and optimiser state replicated over the mesh
        from jax.sharding import NamedSharding, PartitionSpec

        state = jax.device_put(state, NamedSharding(mesh, PartitionSpec()))
        log.info(
            "data parallel over %d devices: %s; %d structures per device per step",
            mesh.devices.size,
            list(mesh.devices.flat),
            tc.batch_size // mesh.devices.size,
        )
    n_params = count_parameters(state.params)
    log.info(
        "model %s: %d parameters; %d training, %d validation structures; %d steps/epoch; padded shapes %s",
        cfg.model.name,
        n_params,
        len(train_ds),
        len(val_ds),
        steps_per_epoch,
        [(r.n_graph, r.n_node, r.n_edge) for r in train_loader.ladder.rungs],
    )

    shallow = getattr(pot, "with_force_spread", None)  # a shallow ensemble: per-head forces only for the force NLL
    step_pot, eval_pot = (shallow(tc.nll_forces), shallow(False)) if shallow else (pot, pot)
    train_step = make_train_step(
        step_pot, opt, tc.beta, tc.stress_weight, tc.ema_decay, mesh is not None, nll_weight(cfg.model, tc)
    )
    if multi:  # each process's own copy of the replicated arrays
        local = distributed.to_host
    else:
        local = (lambda t: t) if mesh is None else (lambda t: jax.device_put(t, jax.local_devices()[0]))
    eval_fn = make_eval_fn(eval_pot, tc.stress_weight > 0)
    metrics_csv = MetricsCSV(out / "metrics.csv") if writer else _NoMetrics()

    def validate(ema):
        m = evaluate(eval_pot, local(ema), val_loader, eval_fn)
        return distributed.broadcast_json(m) if multi else m  # model selection follows process 0 everywhere

    pbar = tqdm(
        total=step_budget(tc, steps_per_epoch),
        initial=run_progress.step,
        desc=f"train {cfg.model.name}",
        disable=not (progress and writer),
        dynamic_ncols=True,
        unit="step",
    )
    loop = TrainingLoop(
        tc,
        train_step,
        train_loader,
        validate=validate,
        learning_rate=lambda step, opt_state: current_learning_rate(tc, step, opt_state),
        checkpointer=ckpt,
        metrics=metrics_csv,
        pbar=pbar,
        agree=(lambda value: distributed.broadcast_json(value)) if multi else None,
        budget_schedule=BudgetSchedule(tc, step_budget(tc, steps_per_epoch)) if budget_driven(tc) else None,
    )
    try:
        state, run_progress, timing = loop.run(state, run_progress)
    except Exception as e:
        failure = distributed.collective_failure(e, run_progress.step, ckpt.latest_step()) if multi else None
        if failure is not None:
            raise failure from e
        raise
    finally:
        pbar.close()
        metrics_csv.close()
        ckpt.close()
    with distributed.agreement("writing the run folder on process 0"):
        results = _finish(
            writer,
            _FinishedRun(
                cfg=cfg,
                pot=pot,
                state=state,
                local=local,
                progress=run_progress,
                timing=timing,
                out=out,
                n_params=n_params,
                train_ds=train_ds,
                val_ds=val_ds,
                test_ds=test_ds,
                train_loader=train_loader,
                val_loader=val_loader,
                eval_fn=eval_fn,
                eval_batch_size=eval_batch_size,
                mesh=mesh,
                train_step=train_step,
                t_setup=t_setup,
                init_summary=init_summary,
            ),
        )
    return results


class _NoMetrics:
    """The metrics writer of processes other than process 0: they write nothing."""

    def write(self, row: dict) -> None:
        pass

    def close(self) -> None:
        pass


@dataclasses.dataclass
class _FinishedRun:
    """What `_train` hands to `_finish`: the run's configuration and data, the parts it built and the loop's
    outcome (state, progress, timing)."""

    cfg: RunConfig
    pot: Potential
    state: TrainState
    local: Callable[[Any], Any]  # replicated arrays → this process's own copy
    progress: Progress
    timing: LoopTiming
    out: Path
    n_params: int
    train_ds: Any
    val_ds: Any
    test_ds: Any
    train_loader: GraphLoader
    val_loader: GraphLoader
    eval_fn: Callable
    eval_batch_size: int
    mesh: Any
    train_step: Callable
    t_setup: float  # perf_counter() when the run began (for the overhead time)
    init_summary: dict | None


def _finish(writer: bool, run: _FinishedRun) -> dict:
    """Process 0: the best model, the final errors, plots and results.json. Other processes: their step count."""
    tc, pot, out, timing, progress = run.cfg.training, run.pot, run.out, run.timing, run.progress
    if not writer:
        return {
            "process_id": distributed.process_index(),
            "steps": progress.step,
            "train_time_s": timing.train_time_s,
            "input_wait_s": run.train_loader.wait_s,
            "out": None,
        }
    best = run.local(run.state.best)
    calibration = None
    if hasattr(pot, "with_calibration"):  # a shallow ensemble: its spread calibrated on the validation set
        from so3lib.training.ensemble import calibrate

        calibration = calibrate(pot, best, _in_memory(run.val_ds), run.eval_batch_size)
        pot = pot.with_calibration(calibration["energy_scale"] or 1.0, calibration["forces_scale"] or 1.0)
    save_potential(out / "model", pot, best)
    results: dict[str, Any] = {
        "model": run.cfg.model.name,
        "n_parameters": run.n_params,
        "train_time_s": timing.train_time_s,
        "steps": progress.step,
        "epochs_completed": progress.epoch,
        "stopped_because": progress.stopped,
        "best_step": progress.best_step,
        "compile_time_s": timing.compile_time_s,
        "overhead_time_s": None,
        "steps_per_s": timing.steps_per_s,
        "input_wait_s": run.train_loader.wait_s,  # the step waiting for its batch (this session, first batch excluded)
        "n_train": len(run.train_ds),
        "n_val": len(run.val_ds),
        "batch_size": tc.batch_size,
        "n_devices": tc.n_devices,
        "streamed": not isinstance(run.train_ds, Dataset),
        "n_compiles_train_step": _cache_size(run.train_step),
        "padded_shapes_train": sorted(run.train_loader.shapes_seen),
        "energy_reference": pot.reference.to_dict(),
        "scale_ev": pot.scale,
        "shift_ev_per_atom": pot.shift,
    }
    if run.init_summary is not None:
        results["init"] = run.init_summary
    if calibration is not None:
        results["readout_heads"] = run.cfg.model.readout_heads
        results["nll_weight"] = nll_weight(run.cfg.model, tc)
        results["calibration"] = calibration
    if results["steps_per_s"]:
        results["structures_per_s"] = results["steps_per_s"] * tc.batch_size
    results["val"] = _without_mse(evaluate(pot, best, run.val_loader, run.eval_fn))
    train_eval = _train_eval_loader(run.train_ds, pot, run.train_loader, run.eval_batch_size, run.mesh)
    results["train"] = _without_mse(evaluate(pot, best, train_eval, run.eval_fn))
    from so3lib import plotting

    name = run.cfg.name
    plotting.learning_curve(out / "metrics.csv", out / "plots" / "learning_curve.png", f"{name}: {run.cfg.model.name}")
    if run.test_ds is not None:
        test_ds = run.test_ds
        test_loader = make_loader(test_ds, pot, run.eval_batch_size, False, 0, "test")
        test_stress = _has_stress(test_ds) and tc.stress_weight == 0
        test_eval = run.eval_fn
        if test_stress or calibration is not None:  # a shallow ensemble: the calibrated spread of the full potential
            test_eval = make_eval_fn(pot, test_stress or tc.stress_weight > 0)
        results["test"] = _test(pot, best, test_loader, test_eval, out / "plots", name)
        _save_test_predictions(pot, best, test_ds, test_loader, test_eval, out / "test_predictions.extxyz")
    if calibration is not None:
        results["uncertainty"] = _uncertainty_reports(
            pot, best, run.val_ds, run.test_ds, run.eval_batch_size, out, name
        )
    # data, neighbour lists, evaluation, plots
    results["overhead_time_s"] = time.perf_counter() - run.t_setup - timing.train_time_s
    if distributed.active():
        results["n_processes"] = jax.process_count()
    run_folder.write_atomic(out / "results.json", run_folder.to_json(results))
    return results


def _uncertainty_reports(pot, params, val_ds, test_ds, batch_size: int, out: Path, name: str) -> dict:
    """How a shallow ensemble's calibrated spread ranks the real errors on the validation and test sets
    (`so3lib.ensemble.uncertainty_report`), and plots/calibration.png."""
    from so3lib import ensemble as ens_lib

    reports = {}
    for split, ds in (("validation", val_ds), ("test", test_ds)):
        if ds is not None and (isinstance(ds, Dataset) or len(ds) <= TEST_PREDICTIONS_MAX_FRAMES):
            ds = _in_memory(ds)
            reports[split] = ens_lib.uncertainty_report(ens_lib.predict_arrays(pot, params, ds, batch_size), ds)
    heads = pot.model.readout_heads
    ens_lib.calibration_plot(reports, out / "plots" / "calibration.png", f"{name}: shallow ensemble of {heads} heads")
    return reports


def _in_memory(ds):
    """A `Dataset` of every frame of ``ds`` (a streamed `DatasetView` is read into memory)."""
    return ds if isinstance(ds, Dataset) else ds.materialize(np.arange(len(ds)))


def _source(ds) -> str:
    return str(getattr(ds, "source", None) or ds.meta["source"][0])


def _check_splits(train_ds, val_ds, tc) -> None:
    """What must hold before the first step: frames to train and validate on, stress labels where asked for."""
    for name, ds in (("training", train_ds), ("validation", val_ds)):
        if ds is None or len(ds) == 0:
            raise DataError(
                "<splits>" if ds is None else _source(ds),
                f"the {name} set is empty: give it frames (a --val file, or a larger --val-fraction)",
            )
    if tc.stress_weight > 0 and isinstance(train_ds, Dataset):
        usable = train_ds.pbc.all(axis=1)
        if train_ds.stress is not None:
            usable &= np.isfinite(train_ds.stress).all(axis=(1, 2))
        if train_ds.stress is None or not usable.any():
            raise DataError(
                _source(train_ds),
                f"stress_weight {tc.stress_weight:g} but no training frame has a stress label with a periodic cell "
                "(stress is only defined for periodic frames)",
                "stress",
            )


def _start_or_resume(
    state: TrainState, ckpt: Checkpointer, resume: bool, metrics_path: Path
) -> tuple[TrainState, Progress]:
    """``state`` at step 0, or (with ``resume``) the newest readable checkpoint, metrics.csv cut back to its step."""
    if not (resume and ckpt.latest_step() is not None):
        if not resume and metrics_path.exists():
            metrics_path.unlink()
        return state, Progress()
    tree, meta = ckpt.restore(state.to_dict())
    state = TrainState.from_dict(jax.tree_util.tree_map(jnp.asarray, tree))
    progress = Progress.from_dict(meta)
    log.info(
        "resumed from checkpoint at step %d (epoch %d, batch %d)",
        progress.step,
        progress.epoch,
        progress.batch_in_epoch,
    )
    MetricsCSV.truncate(metrics_path, progress.step)
    return state, progress


PARITY_MAX_STRUCTURES = 20_000  # a streamed test set's parity plots show about this many structures


def _test(pot: Potential, params, loader: GraphLoader, eval_fn, plots: Path, name: str) -> dict:
    """Test errors of ``params`` (logged, with parity plots of what is labelled: of every structure of an
    in-memory set, of about `PARITY_MAX_STRUCTURES` spread over a streamed one)."""
    streamed = not isinstance(loader.dataset, Dataset)
    m = evaluate(pot, params, loader, eval_fn, collect=True, collect_max=PARITY_MAX_STRUCTURES if streamed else None)
    pred = m.pop("predictions")
    if streamed and len(pred["n_atoms"]) < m["n_structures"]:
        log.info("test parity plots: %d of the %d test structures", len(pred["n_atoms"]), m["n_structures"])
    _parity_plots(pred, plots, name)
    log.info(
        "test: energy MAE %s meV (%s meV/atom), forces MAE %s meV/Å on %d structures%s",
        fmt(to_mev(m["energy_mae_ev"])),
        fmt(to_mev(m["energy_mae_per_atom_ev"])),
        fmt(to_mev(m["forces_mae_ev_per_a"])),
        m["n_structures"],
        f", stress MAE {fmt(to_mev(m['stress_mae_ev_per_a3']))} meV/Å³" if "stress_mae_ev_per_a3" in m else "",
    )
    return _without_mse(m)


def _has_stress(ds) -> bool:
    """Some frame of an in-memory set has a finite stress label and a full periodic cell."""
    if not isinstance(ds, Dataset) or ds.stress is None:
        return False
    return bool((np.isfinite(ds.stress).all(axis=(1, 2)) & ds.pbc.all(axis=1)).any())


TEST_PREDICTIONS_MAX_FRAMES = 20_000  # a streamed test set larger than this is not written out frame by frame


def _save_test_predictions(pot: Potential, params, test_ds, loader: GraphLoader, eval_fn, path: Path) -> None:
    """Every test structure's predictions beside its labels (`so3lib.prediction.write_predictions`), from the
    test loader and the compiled evaluation (no new compilation)."""
    from so3lib.prediction import predict_dataset, write_predictions

    if not isinstance(test_ds, Dataset):
        if len(test_ds) > TEST_PREDICTIONS_MAX_FRAMES:
            log.info("test set of %d frames: per-structure predictions not written", len(test_ds))
            return
        test_ds, loader = test_ds.materialize(np.arange(len(test_ds))), None
    fn = lambda p, g: eval_fn(p, g)[1]  # noqa: E731  (error sums, predictions)
    pred = predict_dataset(pot, params, test_ds, loader.batch_size if loader else 64, loader=loader, fn=fn)
    write_predictions(path, test_ds, pred)
    log.info("test predictions: %s", path)


def _write_run_config(cfg: RunConfig, out: Path, resume: bool, splits: dict | None) -> None:
    """config.yaml (a resumed run must keep its model) and splits.npz."""
    if resume and (out / "config.yaml").exists():
        saved = RunConfig.from_yaml(out / "config.yaml")
        if saved.model.config_view() != cfg.model.config_view():
            raise ValueError(
                f"{out}/config.yaml has model {saved.model.config_view()}, the resumed run asks for "
                f"{cfg.model.config_view()}: a resumed run must keep its model"
            )
    run_folder.write_atomic(out / "config.yaml", cfg.to_yaml())
    if splits:
        from so3lib.data.splits import save_splits

        save_splits(out / "splits.npz", splits)


def _log_reference(pot: Potential) -> None:
    ref = pot.reference
    log.info(
        "energy reference (%s): %s; residual std %.4g meV/atom (raw %.4g meV/atom); scale %.4g eV, shift %.4g eV/atom",
        ref.method,
        dict(zip(ref.species, np.round(ref.energies_ev, 4))),
        1e3 * ref.residual_std_per_atom_ev,
        1e3 * ref.raw_std_per_atom_ev,
        pot.scale,
        pot.shift,
    )


def _train_eval_loader(train_ds, pot: Potential, train_loader: GraphLoader, batch_size: int, mesh) -> GraphLoader:
    """The training set unshuffled for the final errors, reusing the training loader's neighbour lists; a
    streamed training set is measured on a sample of up to 5 000 frames."""
    if isinstance(train_ds, Dataset) and mesh is None:
        return GraphLoader(
            train_ds,
            pot.cutoff,
            batch_size,
            shuffle=False,
            table=train_loader.table,
            dtype=train_loader.dtype,
            energy_offset=train_loader.energy_offset,
            descriptor_cache=train_loader.descriptor_cache,
        )
    sub = (
        train_ds
        if isinstance(train_ds, Dataset) or len(train_ds) <= 5000
        else train_ds.subset(np.sort(np.random.default_rng(0).choice(len(train_ds), 5000, replace=False)))
    )
    return make_loader(sub, pot, batch_size, False, 0, "training")


def _parity_plots(pred: dict, plots: Path, name: str) -> None:
    """Test-set parity plots of the labelled energies and forces (none drawn for an absent label)."""
    from so3lib import plotting

    if len(pred["e_ref"]):
        plotting.parity(
            pred["e_ref"] / pred["n_atoms"],
            pred["e_pred"] / pred["n_atoms"],
            plots / "parity_energy.png",
            "energy per atom (minus reference)",
            "eV/atom",
            f"{name}: test energies",
        )
    else:
        log.info("test set has no energy labels: no energy parity plot")
    if len(pred["f_ref"]):
        plotting.parity(
            pred["f_ref"],
            pred["f_pred"],
            plots / "parity_forces.png",
            "force component",
            "eV/Å",
            f"{name}: test forces",
        )
    else:
        log.info("test set has no force labels: no force parity plot")


def _without_mse(m: dict) -> dict:
    return {k: v for k, v in m.items() if not k.startswith("mse")}


def _cache_size(fn) -> int | None:
    try:
        return int(fn._cache_size())
    except Exception:  # private API; absent in some jax versions
        return None
