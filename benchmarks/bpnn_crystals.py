"""BPNN training speed on periodic cells, as a ratio to SchNet F=128 T=3 on the same data, interleaved in one run.

Data: the mlearn Li training cells (periodic, mostly 53–54 atoms; ../shared/data/materials). Models, all with the
same cutoff: SchNet F=128 T=3; BPNN with its descriptors and edge Jacobians computed once per structure and reused
(``precompute_descriptors``, the default; its one-time cost is reported as ``cache_build_s``); BPNN recomputing
descriptors and triplets in every step (``precompute_descriptors: false``, the path before the cache). Each model
gets its batches from the trainer's own loader (`make_loader`), built ahead for a whole epoch; then the steps run
round-robin (one step of each model per round), so load from other processes on a shared machine hits all models
alike; the ratios of steps/s are the figures to read, the absolute times depend on the load (reported).

With --md-only: adds to the JSON the triplets one MD energy call evaluates on a Li supercell, before (all
neighbour-slot pairs) and now (exact triplets inside the angular cutoff, and their capacity).

usage: python benchmarks/bpnn_crystals.py [--batch 8] [--rounds 10] [--cutoff 6.0] [--preset auto]
           [--out benchmarks/results/bpnn_crystals.json] [--md-only]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = Path(os.environ.get("SO3LIB_SHARED_DATA", ROOT.parent / "shared" / "data"))

import jax  # noqa: E402

import so3lib.data as data  # noqa: E402
from so3lib.graph.batching import budget_key  # noqa: E402
from so3lib.models import make_config  # noqa: E402
from so3lib.potential import Potential, fit_scale_shift  # noqa: E402
from so3lib.training.config import TrainingConfig  # noqa: E402
from so3lib.training.optim import make_optimizer  # noqa: E402
from so3lib.training.trainer import init_state, make_loader, make_train_step  # noqa: E402


def setup(name: str, opts: dict, ds, batch: int) -> dict:
    cfg = make_config(name, **opts).fit(ds)
    ref = data.fit_energy_reference(ds, method="lstsq")
    pot = Potential(cfg, ref, *fit_scale_shift(ds, ref))
    t0 = time.perf_counter()
    loader = make_loader(ds, pot, batch, True, 0, "training")
    loader_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    batches = list(loader.epoch(0))
    batch_build_s = (time.perf_counter() - t0) / len(batches)
    params = pot.init(jax.random.PRNGKey(0), batches[0])
    tc = TrainingConfig(max_steps=1000, batch_size=batch)
    opt = make_optimizer(tc, 100)
    step = make_train_step(pot, opt, tc.beta, 0.0, tc.ema_decay)
    state = init_state(params, opt.init(params))
    t0 = time.perf_counter()
    seen = set()
    for g in batches:  # compile every padded shape of the epoch before timing
        if budget_key(g) not in seen:
            seen.add(budget_key(g))
            state, loss, _ = step(state, g)
            jax.block_until_ready(loss)
    g = batches[0]
    return {
        "step": step,
        "state": state,
        "batches": batches,
        "times": [],
        "info": {
            "config": {k: v for k, v in cfg.config_view().items() if k != "symmetry_functions"},
            "n_parameters": int(sum(np.size(x) for x in jax.tree_util.tree_leaves(params))),
            "loader_setup_s": loader_s,  # neighbour lists (+ the one-time descriptor cache for the cached BPNN)
            "batch_build_s_per_batch": batch_build_s,
            "compile_s_all_shapes": time.perf_counter() - t0,
            "n_padded_shapes": len(seen),
            "padded_nodes": int(g.nodes["positions"].shape[0]),
            "padded_edges": int(g.senders.shape[0]),
            "padded_triplets": int(g.globals["triplets"].shape[0]) if "triplets" in g.globals else 0,
            "descriptor_cache_mib": (
                None
                if getattr(loader, "descriptor_cache", None) is None
                else sum(
                    x.nbytes
                    for x in (loader.descriptor_cache.G, loader.descriptor_cache.J, loader.descriptor_cache.vectors)
                )
                / 2**20
            ),
        },
    }


def md_triplet_counts(ds, cutoff: float, skin: float = 1.0) -> dict:
    """Triplets per MD energy call on the largest bulk Li cell, as a supercell that holds the cutoff + skin:
    all N·K(K−1)/2 neighbour-slot pairs (the MD path before) against the exact triplets and their capacity."""
    import ase.build
    from jax_md import partition, space

    from so3lib.md import triplets

    s = ds[int(np.argmax(ds.n_atoms))]
    atoms = s.to_ase()
    heights = abs(np.linalg.det(s.cell)) / np.linalg.norm(np.cross(s.cell[[1, 2, 0]], s.cell[[2, 0, 1]]), axis=1)
    reps = [int(np.ceil(2 * (cutoff + skin) / h + 1e-9)) for h in heights]
    atoms = ase.build.make_supercell(atoms, np.diag(reps))
    cell = np.asarray(atoms.cell.array)
    disp, _ = space.periodic_general(jax.numpy.asarray(cell.T), fractional_coordinates=False)
    fn = partition.neighbor_list(
        disp, jax.numpy.asarray(cell.T), cutoff + skin, format=partition.Dense, disable_cell_list=True
    )
    R = jax.numpy.asarray(atoms.get_positions(wrap=True))
    idx = fn.allocate(R).idx
    N, K = idx.shape
    n = int(triplets.count_triplets(R, idx, cell, True, cutoff))
    frac = triplets.fraction_for(n, N, K, 1.25)
    return {
        "structure": f"{len(s.numbers)}-atom Li cell × {reps}",
        "n_atoms": N,
        "neighbour_slots_K": K,
        "cutoff_plus_skin_angstrom": cutoff + skin,
        "slot_pairs_before": N * K * (K - 1) // 2,
        "exact_triplets": n,
        "capacity_now": triplets.capacity(N, K, frac),
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--cutoff", type=float, default=6.0)
    ap.add_argument("--preset", default="auto", help="BPNN symmetry-function preset (auto, fortnet, g2g4g5)")
    ap.add_argument("--skip-direct", action="store_true", help="leave out the BPNN without the cache")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bpnn_crystals.json"))
    ap.add_argument("--md-only", action="store_true", help="add the MD triplet counts to an existing --out")
    a = ap.parse_args(argv)
    ds = data.read(SHARED / "materials" / "li_mlearn_training.json")
    if a.md_only:
        res = json.loads(Path(a.out).read_text())
        res["md_triplets"] = md_triplet_counts(ds, a.cutoff)
        res["md_command"] = "python benchmarks/bpnn_crystals.py " + " ".join(argv if argv is not None else sys.argv[1:])
        print(json.dumps(res["md_triplets"]))
        Path(a.out).write_text(json.dumps(res, indent=2, default=str))
        return res
    bp = {"preset": a.preset, "cutoff": a.cutoff} if a.preset == "auto" else {"preset": a.preset}
    models = {
        "schnet_F128_T3": ("schnet", {"n_atom_basis": 128, "n_interactions": 3, "n_rbf": 20, "cutoff": a.cutoff}),
        "bpnn_cached": ("bpnn", bp),
    }
    if not a.skip_direct:
        models["bpnn_direct"] = ("bpnn", {**bp, "precompute_descriptors": False})
    load_before = os.getloadavg()
    runs = {}
    for key, (name, opts) in models.items():
        runs[key] = setup(name, opts, ds, a.batch)
        print(key, json.dumps(runs[key]["info"]), flush=True)
    for r in range(a.rounds):  # round-robin: one step of each model per round
        for run in runs.values():
            g = run["batches"][(r + 1) % len(run["batches"])]
            t0 = time.perf_counter()
            run["state"], loss, _ = run["step"](run["state"], g)
            jax.block_until_ready(loss)
            run["times"].append(time.perf_counter() - t0)
        print(f"round {r + 1}/{a.rounds}: " + ", ".join(f"{k} {v['times'][-1] * 1e3:.0f} ms" for k, v in runs.items()))
    res = {
        "command": "python benchmarks/bpnn_crystals.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": platform.platform(),
        "cpu_count": os.cpu_count(),
        "load_average_before_after": [load_before, os.getloadavg()],
        "note": "shared machine under load from other processes: read the ratios (interleaved), not absolute times",
        "devices": [str(d) for d in jax.devices()],
        "jax": jax.__version__,
        "data": "mlearn Li training cells (li_mlearn_training.json), periodic",
        "n_structures": len(ds),
        "batch": a.batch,
        "rounds": a.rounds,
        "models": {},
    }
    for key, run in runs.items():
        t = np.asarray(run["times"])
        res["models"][key] = {
            **run["info"],
            "step_ms_median": 1e3 * float(np.median(t)),
            "steps_per_s": 1.0 / float(np.median(t)),
            "step_ms_all": (1e3 * t).round(2).tolist(),
        }
    s = res["models"]["schnet_F128_T3"]["steps_per_s"]
    res["ratios_steps_per_s"] = {
        f"{k}/schnet_F128_T3": v["steps_per_s"] / s for k, v in res["models"].items() if k != "schnet_F128_T3"
    }
    if "bpnn_direct" in res["models"]:
        res["ratios_steps_per_s"]["bpnn_cached/bpnn_direct"] = (
            res["models"]["bpnn_cached"]["steps_per_s"] / res["models"]["bpnn_direct"]["steps_per_s"]
        )
    for k, v in res["models"].items():
        print(f"{k}: {v['step_ms_median']:.1f} ms/step median, {v['steps_per_s']:.2f} steps/s")
    print("ratios:", json.dumps(res["ratios_steps_per_s"]))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2, default=str))
    print(f"wrote {a.out}")
    return res


if __name__ == "__main__":
    main()
