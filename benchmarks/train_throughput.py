"""Training and inference throughput of so3lib models on real rMD17 data, reported as a ratio to the bare
jitted SchNet floor (../shared/bench/bare_floor.py) measured in the same run on the same machine.

Measures, per model: train step time (batch B, real data pipeline feeding the step: neighbour lists, padding,
prefetch), structures/s, compile time and compile count; energy+forces latency for one molecule and
throughput at batch 1000. With --lmax-sweep: SO3krates step time for l_max = 1..4 at fixed F and T.
Writes JSON.

usage: python benchmarks/train_throughput.py [--models schnet] [--batch 32] [--steps 50] [--molecule ethanol]
           [--lmax-sweep] [--no-floor] [--out benchmarks/results/train_throughput.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared"

import jax  # noqa: E402

import so3lib.data as data  # noqa: E402
from so3lib.graph import GraphLoader  # noqa: E402
from so3lib.models import make_config  # noqa: E402
from so3lib.potential import Potential, fit_scale_shift  # noqa: E402
from so3lib.training.config import TrainingConfig  # noqa: E402
from so3lib.training.optim import make_optimizer  # noqa: E402
from so3lib.training.trainer import init_state, make_train_step  # noqa: E402

# Model sizes of the TARGETS.md comparison (F≈128, 3 layers, cutoff 5 Å)
MODELS = {
    "schnet": {"n_atom_basis": 128, "n_interactions": 3, "n_rbf": 20, "cutoff": 5.0},
    "so3krates": {"features": 128, "l_max": 3, "layers": 3, "heads": 4, "cutoff": 5.0},
    "bpnn": {"preset": "auto", "cutoff": 5.0},
}


def run_floor(batch: int, steps: int) -> dict:
    script = SHARED / "bench" / "bare_floor.py"
    if not script.exists():
        return {"error": f"{script} not found"}
    p = subprocess.run(
        [sys.executable, str(script), "--model", "schnet", "--batch", str(batch), "--steps", str(steps)],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    out = p.stdout + p.stderr
    m = re.search(r"step time median ([\d.]+) ms", out)
    e = re.search(r"then median ([\d.]+) ms / batch", out)
    c = re.search(r"compile ([\d.]+)s", out)
    if not m:
        return {"error": out[-2000:]}
    return {
        "train_step_ms": float(m.group(1)),
        "energy_forces_batch_ms": float(e.group(1)) if e else None,
        "compile_s": float(c.group(1)) if c else None,
        "structures_per_s": batch / float(m.group(1)) * 1e3,
    }


def bench_model(name: str, opts: dict, ds: data.Dataset, batch: int, steps: int) -> dict:
    cfg = make_config(name, **opts).fit(ds)
    ref = data.fit_energy_reference(ds, method="average")  # one molecule: least squares is undetermined
    pot = Potential(cfg, ref, *fit_scale_shift(ds, ref))
    loader = GraphLoader(ds, pot.cutoff, batch, seed=0, energy_offset=ref.energy(ds), triplet_cutoff=cfg.triplet_cutoff)
    it = loader.epoch(0)
    g0 = next(it)
    params = pot.init(jax.random.PRNGKey(0), g0)
    tc = TrainingConfig(max_steps=steps, batch_size=batch)
    opt = make_optimizer(tc, 100)
    step = make_train_step(pot, opt, tc.beta, 0.0, tc.ema_decay)
    state = init_state(params, opt.init(params))
    t0 = time.perf_counter()
    state, loss, _ = step(state, g0)
    jax.block_until_ready(loss)
    compile_s = time.perf_counter() - t0
    # steady state with the real pipeline feeding the step (loader threads build and pad ahead)
    done, ep, times = 0, 0, []
    t_start = time.perf_counter()
    while done < steps:
        for g in loader.epoch(ep):
            ts = time.perf_counter()
            state, loss, _ = step(state, g)
            jax.block_until_ready(loss)
            times.append(time.perf_counter() - ts)
            done += 1
            if done >= steps:
                break
        ep += 1
    wall = time.perf_counter() - t_start
    n_params = int(sum(np.size(x) for x in jax.tree_util.tree_leaves(state["params"])))
    # inference: energy+forces for one molecule and for a batch of 1000
    ef = jax.jit(pot.__call__)
    res_inf = {}
    for b in (1, 1000):
        ld = GraphLoader(
            ds.subset(np.arange(min(b, len(ds)))), pot.cutoff, b, shuffle=False, triplet_cutoff=cfg.triplet_cutoff
        )
        g = next(ld.epoch(0))
        jax.block_until_ready(ef(state["params"], g))
        ts = []
        for _ in range(10 if b == 1 else 5):
            t1 = time.perf_counter()
            jax.block_until_ready(ef(state["params"], g))
            ts.append(time.perf_counter() - t1)
        res_inf[b] = float(np.median(ts))
    return {
        "config": cfg.config_view(),
        "n_parameters": n_params,
        "compile_s": compile_s,
        "train_step_ms_median": 1e3 * float(np.median(times)),
        "train_step_ms_wall": 1e3 * wall / steps,
        "structures_per_s": batch * steps / wall,
        "steps_per_s": steps / wall,
        "n_compiles_train_step": int(step._cache_size()) if hasattr(step, "_cache_size") else None,
        "padded_shapes": sorted(loader.shapes_seen),
        "energy_forces_1_molecule_ms": 1e3 * res_inf[1],
        "energy_forces_batch1000_structures_per_s": min(1000, len(ds)) / res_inf[1000],
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["schnet"])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--molecule", default="ethanol")
    ap.add_argument("--lmax-sweep", action="store_true", help="SO3krates step time for l_max = 1..4")
    ap.add_argument("--sweep-features", type=int, default=64)
    ap.add_argument("--no-floor", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "train_throughput.json"))
    a = ap.parse_args(argv)
    ds = data.read(SHARED / "data" / "rmd17" / f"rmd17_{a.molecule}_train_01.npz")
    res = {
        "machine": platform.platform(),
        "devices": [str(d) for d in jax.devices()],
        "jax": jax.__version__,
        "molecule": a.molecule,
        "batch": a.batch,
        "steps": a.steps,
        "models": {},
    }
    if not a.no_floor:
        res["bare_floor_schnet"] = run_floor(a.batch, max(a.steps, 20))
        print("bare floor:", res["bare_floor_schnet"])
    for name in a.models:
        r = bench_model(name, MODELS.get(name, {}), ds, a.batch, a.steps)
        fl = res.get("bare_floor_schnet", {})
        if fl.get("train_step_ms"):
            r["ratio_to_bare_floor_train_step"] = r["train_step_ms_wall"] / fl["train_step_ms"]
        res["models"][name] = r
        print(
            f"{name}: {r['train_step_ms_wall']:.2f} ms/step ({r['structures_per_s']:.0f} structures/s, "
            f"ratio to floor {r.get('ratio_to_bare_floor_train_step', float('nan')):.2f}), compile "
            f"{r['compile_s']:.1f} s, {r['n_compiles_train_step']} compile(s); E+F 1 molecule "
            f"{r['energy_forces_1_molecule_ms']:.2f} ms, "
            f"batch 1000: {r['energy_forces_batch1000_structures_per_s']:.0f}/s"
        )
    if a.lmax_sweep:
        sweep = {}
        for lmax in (1, 2, 3, 4):
            opts = {**MODELS["so3krates"], "features": a.sweep_features, "l_max": lmax}
            r = bench_model("so3krates", opts, ds, a.batch, a.steps)
            sweep[lmax] = {k: r[k] for k in ("train_step_ms_wall", "train_step_ms_median", "compile_s", "n_parameters")}
            print(f"so3krates l_max={lmax}: {r['train_step_ms_wall']:.2f} ms/step")
        res["so3krates_lmax_sweep"] = sweep
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2, default=str))
    print(f"wrote {a.out}")
    return res


if __name__ == "__main__":
    main()
