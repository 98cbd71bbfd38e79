"""The SPICE benchmark: MACE-OFF-style preprocessing, a packed memory-mapped store, a split by molecule,
streamed training with any registered model (optionally data parallel over several devices) and the test
errors per SPICE subset.

Without ``data`` (or ``download``) it runs on the real SPICE 1.1.4 sample bundled in so3lib (two molecules, 55
conformations; a smoke test of the pipeline, not a benchmark). Both sample molecules are charged ([N+] and
[Na+]) and sodium is no MACE-OFF element, so for the bundled sample the neutral filter is off (said in the
output and in results.json), the split is by conformation and, with a single composition left, the energy
reference is ``average``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from so3lib import data
from so3lib.data.spice import MACE_OFF_ELEMENTS
from so3lib.training.run_folder import to_json, write_atomic
from so3lib.workflows.common import LabelOptions, command_section
from so3lib.workflows.presets import Preset, PresetTable

log = logging.getLogger("so3lib.spice")
# Published SPICE force MAE anchors (meV/Å), test sets of the papers named.
ANCHORS = {"So3krates (JAX, SPICE 2; Frank et al. 2024)": 29.0, "ViSNet (SPICE 2; Wang et al. 2024)": 14.0}

SAMPLE = PresetTable(  # the bundled sample: a few minutes on 2 CPU cores
    description="spice, bundled sample",
    default=Preset(
        training={
            "batch_size": 8,
            "max_epochs": None,
            "max_steps": 600,
            "learning_rate": 2e-3,
            "eval_every_steps": 50,
            "checkpoint_every_steps": 100,
            "warmup_steps": 20,
            "schedule": "exponential",
            "decay_steps": 600,
            "decay_rate": 0.3,
            "early_stopping_patience": None,
        },
        options={"e0s": "average", "val_fraction": 0.1, "test_fraction": 0.2, "keep_charged": True},
    ),
    models={
        "schnet": Preset(model={"n_atom_basis": 32, "n_interactions": 2}),
        "so3krates": Preset(model={"features": 32, "l_max": 2, "layers": 1}),
        "bpnn": Preset(model={"n_radial": 8, "n_angular": 4, "cutoff": 5.0, "cutoff_angular": 4.0}),
    },
)
FULL = PresetTable(
    description="spice",
    default=Preset(
        training={
            "batch_size": 64,
            "max_epochs": 200,
            "learning_rate": 1e-3,
            "eval_every_steps": 2000,
            "checkpoint_every_steps": 2000,
            "schedule": "plateau",
            "early_stopping_patience": 20,
        }
    ),
)


class SpiceOptions(LabelOptions):
    """Options of ``so3lib spice``."""

    data: str | None = Field(None, description="a SPICE 1.1.4 or 2.0.1 HDF5 file (default: the bundled sample)")
    download: Literal["1.1.4", "2.0.1"] | None = Field(None, description="fetch this SPICE release from Zenodo first")
    download_dir: str = Field("data", description="where --download puts the file")
    store: str | None = Field(None, description="packed store folder (default data/stores/<file stem>)")
    rebuild_store: bool = Field(False, description="rebuild the store even if it matches the source")
    max_force: float | None = Field(10.0, gt=0, description="drop conformers with a force component above this (eV/Å)")
    keep_charged: bool = Field(False, description="keep charged molecules (MACE-OFF drops them)")
    elements: list[int] = Field(list(MACE_OFF_ELEMENTS), description="elements kept (atomic numbers)")
    split: Literal["molecule", "conformation"] = Field("molecule", description="split by molecule or conformation")
    val_fraction: float = Field(0.05, gt=0, lt=1, description="validation share")
    test_fraction: float = Field(0.05, gt=0, lt=1, description="test share")
    split_seed: int = Field(0, description="seed of the split")
    distributed: bool = Field(False, description="one of several processes (hosts or GPUs): see docs/cluster.md")
    coordinator: str | None = Field(
        None, description="--distributed: HOST:PORT of process 0 (default $JAX_COORDINATOR_ADDRESS or SLURM's)"
    )
    num_processes: int | None = Field(
        None, ge=1, description="--distributed: number of processes (default $JAX_NUM_PROCESSES or SLURM's)"
    )
    process_id: int | None = Field(
        None,
        ge=0,
        description="--distributed: this process's id, 0 writes the run (default $JAX_PROCESS_ID or SLURM's)",
    )
    distributed_timeout_s: int = Field(
        300, ge=1, description="--distributed: wait this long for every process to start, and for a silent one"
    )


def is_bundled(options: dict) -> bool:
    return options.get("data") is None and options.get("download") is None


def preset(model: str, options: dict) -> Preset:
    return (SAMPLE if is_bundled(options) else FULL).for_model(model)


def split_frames(view, how: str, val_fraction: float, test_fraction: float, seed: int) -> tuple[dict, str]:
    """{train, val, test} indices into the view, and a description. By molecule unless fewer than three
    molecules are left (then by conformation, with a note)."""
    _, rank = np.unique(view.molecules["name"].astype(str), return_inverse=True)  # per molecule, not per frame
    rank = rank.reshape(-1)[view.molecule_index()]  # each frame's molecule name, as its rank among the names
    n_mol = len(np.unique(rank))
    fr = (round(1 - val_fraction - test_fraction, 6), val_fraction, test_fraction)
    if how == "molecule" and n_mol >= 3:
        s = data.split_by_group_rank(rank, fr, seed=seed)
        return s, f"by molecule ({n_mol} molecules; fractions {fr}), seed {seed}"
    if how == "molecule":
        log.warning("only %d molecule(s) left after filtering: splitting by conformation instead of by molecule", n_mol)
        print(
            f"note: only {n_mol} molecule(s) left after filtering, so the split is by conformation (a split by "
            "molecule needs at least 3)"
        )
    s = data.random_split(len(view), fr, seed=seed)
    return s, f"by conformation ({len(view)} conformations; fractions {fr}), seed {seed}"


def per_subset(run_dir: Path, test_view, batch_size: int) -> list[dict]:
    """Test errors of the saved best model for each SPICE subset and overall (one padding ladder and one
    jitted evaluation for all subsets, so no subset recompiles)."""
    from so3lib.training import evaluate, load_potential, make_loader
    from so3lib.training.evaluation import make_eval_fn

    pot, params = load_potential(run_dir)
    eval_fn = make_eval_fn(pot)
    ladder = make_loader(test_view, pot, batch_size, False, 0, "test").ladder
    molecule = test_view.molecule_index()  # per frame; names and subsets are looked up per molecule
    mol_subset, mol_name = test_view.molecules["subset"].astype(str), test_view.molecules["name"].astype(str)
    rows = []
    for name in [*sorted(set(mol_subset[np.unique(molecule)])), "all"]:
        idx = np.arange(len(test_view)) if name == "all" else np.nonzero(mol_subset[molecule] == name)[0]
        loader = make_loader(test_view.subset(idx), pot, batch_size, False, 0, f"test {name}", ladder=ladder)
        m = evaluate(pot, params, loader, eval_fn)
        rows.append(
            {
                "subset": name,
                "conformations": len(idx),
                "molecules": int(len(set(mol_name[np.unique(molecule[idx])]))),
                "energy_mae_mev_per_atom": 1e3 * m["energy_mae_per_atom_ev"],
                "energy_mae_mev": 1e3 * m["energy_mae_ev"],
                "forces_mae_mev_per_a": 1e3 * m["forces_mae_ev_per_a"],
                "forces_rmse_mev_per_a": 1e3 * m["forces_rmse_ev_per_a"],
            }
        )
    return rows


def results_table(rows: list[dict], model: str) -> str:
    lines = [
        f"| subset | molecules | conformations | so3lib {model} E MAE (meV/atom) | so3lib {model} F MAE (meV/Å) |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['subset']} | {r['molecules']} | {r['conformations']} | "
            f"{r['energy_mae_mev_per_atom']:.2f} | {r['forces_mae_mev_per_a']:.1f} |"
        )
    lines += [
        "",
        "Published force MAE on SPICE (other test sets, for scale): "
        + "; ".join(f"{k}: {v:g} meV/Å" for k, v in ANCHORS.items())
        + ".",
    ]
    return "\n".join(lines) + "\n"


def run(opts: SpiceOptions, model, training) -> dict:
    """Convert (or reuse) the store, split, train, evaluate per subset; writes results.json and results.md."""
    from so3lib.data.store import open_store, read_manifest
    from so3lib.training import DataConfig, RunConfig, distributed, train

    if opts.distributed:
        distributed.initialize(opts.coordinator, opts.num_processes, opts.process_id, opts.distributed_timeout_s)
        training = _all_devices(training)
    elif any(v is not None for v in (opts.coordinator, opts.num_processes, opts.process_id)):
        raise ValueError("--coordinator, --num-processes and --process-id need --distributed")
    writer = distributed.is_writer()
    bundled = is_bundled(opts.model_dump())
    neutral_only = not opts.keep_charged
    with distributed.agreement("preparing the store on process 0"):  # process 0 converts; the others wait
        path, store = _source_and_store(opts, writer)
        if writer:
            _convert(opts, path, store, neutral_only, bundled)
    if distributed.active():  # every process reads the store process 0 made (a shared folder, or a copy of it)
        expected = distributed.broadcast_json(read_manifest(store)["fingerprint"] if writer else None)
        with distributed.agreement("opening the store"):
            _check_same_store(store, expected)
    manifest = read_manifest(store)
    view = open_store(store)
    rep = manifest["report"]
    if writer:
        print(
            f"[spice] {path}: kept {rep['conformers_kept']} of {rep['conformers_in']} conformations "
            f"({rep['molecules_kept']} of {rep['molecules_in']} molecules); store {store}"
        )
    splits, split_desc = split_frames(view, opts.split, opts.val_fraction, opts.test_fraction, opts.split_seed)
    tr, va, te = (view.subset(splits[k]) for k in ("train", "val", "test"))
    name = opts.name or f"spice_{path.stem}_{model.name}"
    out = Path(opts.out or f"runs/{name}")
    reference = opts.reference()
    cfg = RunConfig(
        name=name,
        model=model,
        training=training,
        data=DataConfig(
            train=str(path),
            test=str(path),
            split=split_desc,
            split_seed=opts.split_seed,
            val_fraction=opts.val_fraction,
            **reference,
        ),
        command=command_section("spice", opts),
    )
    if writer:
        print(f"[spice] split {split_desc}: {len(tr)} train / {len(va)} val / {len(te)} test conformations")
    res = train(cfg, tr, va, te, out_dir=out, resume=opts.resume, progress=opts.progress, splits=splits)
    with distributed.agreement("evaluating the test set on process 0"):
        if writer:
            return _results(
                res,
                opts,
                out,
                path,
                store,
                bundled,
                neutral_only,
                rep,
                tr,
                va,
                te,
                split_desc,
                reference,
                model,
                training,
            )
    return {**res, "out": str(out)}


def _all_devices(training):
    """A multi-process run trains on every device of every process: --n-devices defaults to all of them."""
    import jax

    if training.n_devices == 1 and jax.device_count() > 1:
        if jax.process_index() == 0:
            n, d = jax.process_count(), jax.device_count()
            print(f"note: --distributed over {n} processes: training on all {d} devices")
        return training.model_copy(update={"n_devices": jax.device_count()})
    return training


def _source_and_store(opts: SpiceOptions, writer: bool) -> tuple[Path, Path]:
    """The SPICE file (fetched with --download on process 0) and the store folder."""
    from so3lib.data.download import SPICE, download

    if opts.download:
        path = Path(opts.download_dir) / SPICE[opts.download].filename  # fetched by process 0 only
        if writer:
            path = Path(download(SPICE[opts.download], opts.download_dir, progress=opts.progress))
    else:
        path = Path(opts.data) if opts.data else data.bundled_path(data.samples.SPICE_SAMPLE)
    if writer and not path.exists():
        raise FileNotFoundError(f"{path}: no such SPICE file")
    return path, Path(opts.store or Path("data") / "stores" / path.stem)


def _convert(opts: SpiceOptions, path: Path, store: Path, neutral_only: bool, bundled: bool) -> None:
    from so3lib.data.store import convert_spice

    if bundled and not neutral_only:
        print(
            "note: the bundled SPICE sample holds only charged molecules ([N+], [Na+]); the neutral-molecule "
            "filter is off for it (pass --data for a real benchmark)"
        )
    convert_spice(
        path,
        store,
        opts.elements,
        neutral_only,
        opts.max_force,
        progress=opts.progress,
        rebuild=opts.rebuild_store,
        nonfinite="drop" if opts.drop_nonfinite_labels else "error",
    )


def _check_same_store(store: Path, expected: dict) -> None:
    """This process sees the store process 0 converted (same source fingerprint), else a one-line error."""
    import socket

    from so3lib.data.store import read_manifest
    from so3lib.training import distributed

    where = f"process {distributed.process_index()} on {socket.gethostname()}"
    if not (store / "manifest.json").exists():
        raise FileNotFoundError(
            f"{store}: no packed store on {where}: every process reads the store process 0 converted; put --store "
            "on a file system all processes see, or copy the store folder to this path on every node"
        )
    if read_manifest(store)["fingerprint"] != expected:
        raise ValueError(
            f"{store} on {where} is not the store process 0 uses (another source file or filters): copy process 0's "
            "store to this path"
        )


def _results(
    res, opts, out, path, store, bundled, neutral_only, rep, tr, va, te, split_desc, reference, model, training
) -> dict:
    """Process 0: the test errors per subset, results.json and results.md."""
    rows = per_subset(out, te, training.eval_batch_size or max(training.batch_size, 64))
    res["spice"] = {
        "data": str(path),
        "bundled_sample": bundled,
        "store": str(store),
        "filters": {"elements": opts.elements, "neutral_only": neutral_only, "max_force_ev_per_a": opts.max_force},
        "counts": {
            "molecules_in": rep["molecules_in"],
            "conformations_in": rep["conformers_in"],
            "molecules_kept": rep["molecules_kept"],
            "conformations_kept": rep["conformers_kept"],
            "train": len(tr),
            "val": len(va),
            "test": len(te),
        },
        "dropped": rep["dropped"],
        "split": split_desc,
        "energy_reference": {
            "method": reference["energy_reference"],
            "residual_std_per_atom_mev": 1e3 * res["energy_reference"]["residual_std_per_atom_ev"],
            "raw_std_per_atom_mev": 1e3 * res["energy_reference"]["raw_std_per_atom_ev"],
        },
        "test_by_subset": rows,
        "anchors_forces_mae_mev_per_a": ANCHORS,
    }
    write_atomic(out / "results.json", to_json(res))
    table = results_table(rows, model.name)
    ref = res["spice"]["energy_reference"]
    write_atomic(
        out / "results.md",
        f"# SPICE ({path.name}), model {model.name}\n\nSplit {split_desc}. Energy reference "
        f"{ref['method']}: residual std {ref['residual_std_per_atom_mev']:.1f} meV/atom "
        f"(raw {ref['raw_std_per_atom_mev']:.0f}).\n\n" + table,
    )
    return {**res, "table": table, "out": str(out)}
