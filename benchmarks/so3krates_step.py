"""SO3krates against SchNet, side by side in one process on the same real rMD17 batches (issue #18 item 4).

Measures, interleaved (A B A B …, one round = ``--steps`` steps of each model, medians over all steps):
  * the jitted train step (loss + gradient + optax update + EMA) at batch B on pre-built padded batches of
    rMD17 ethanol (split 01 train file), SchNet F=128 T=3 against SO3krates F=128 L=3 T=3 H=4;
  * the energy+forces latency of one ethanol (jitted ``Potential.__call__``), also for SO3krates' default
    width F=132;
  * the number of kernels of each compiled program: the ``fusion`` instructions of the optimised HLO and all
    its thunks (instructions outside fused computations, parameters/constants/tuples/bitcasts excluded).
Both models run in the same process with the same XLA and thread settings, so the ratios are what counts on a
shared machine. Results are merged into the JSON under ``--label`` (e.g. ``before`` for the main tree, ``after``
for this branch), with the command.

usage: PYTHONPATH=. python benchmarks/so3krates_step.py [--label after] [--batch 32] [--rounds 8] [--steps 10]
           [--out benchmarks/results/so3krates_step.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SO3LIB_SHARED_DATA", ROOT.parent / "shared" / "data"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import so3lib  # noqa: E402
import so3lib.data as data  # noqa: E402
from so3lib.graph import GraphLoader  # noqa: E402
from so3lib.models import make_config  # noqa: E402
from so3lib.potential import Potential, fit_scale_shift  # noqa: E402
from so3lib.training.config import TrainingConfig  # noqa: E402
from so3lib.training.optim import make_optimizer  # noqa: E402
from so3lib.training.state import init_state  # noqa: E402
from so3lib.training.step import make_train_step  # noqa: E402

MODELS = {
    "schnet": ("schnet", {"n_atom_basis": 128, "n_interactions": 3, "n_rbf": 20, "cutoff": 5.0}),
    "so3krates": ("so3krates", {"features": 128, "l_max": 3, "layers": 3, "heads": 4, "cutoff": 5.0}),
    "so3krates_f132": ("so3krates", {"cutoff": 5.0}),  # the defaults: F=132 L=3 T=3 H=4
}
SKIP_OPS = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast"}


def kernel_counts(hlo_text: str) -> dict:
    """Fusions and thunks of an optimised HLO module: the instructions of the computations that run as thunks
    (the entry and its control flow; not those called by a fusion or applied by a reduce/scatter), except
    parameters, constants, tuples, get-tuple-element and bitcasts."""
    blocks, name = {}, None
    for line in hlo_text.splitlines():
        head = re.match(r"^(ENTRY\s+)?%(\S+)\s+\(.*\{\s*$", line)
        if head:
            name = head.group(2)
            blocks[name] = []
        elif line.startswith("}"):
            name = None
        elif name is not None:
            blocks[name].append(line.strip())
    inner = set(re.findall(r"(?:calls|to_apply)=%([\w.\-]+)", hlo_text))
    fusions = thunks = 0
    for comp, lines in blocks.items():
        if comp in inner:
            continue
        for s in lines:
            op = re.match(r"^(?:ROOT\s+)?%\S+\s*=\s*.*?\s([a-z][\w\-]*)\(", s)
            if not op or op.group(1) in SKIP_OPS:
                continue
            thunks += 1
            fusions += op.group(1) == "fusion"
    return {"fusions": fusions, "thunks": thunks}


def xla_cost(compiled) -> dict:
    """XLA's own estimate for a compiled program: floating-point operations and bytes read + written by its
    kernels (independent of the machine's load; a step whose time follows the bytes is memory-bound)."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return {"gflop": float(cost["flops"]) / 1e9, "bytes_accessed_gb": float(cost["bytes accessed"]) / 1e9}


def build(name: str, ds):
    family, opts = MODELS[name]
    cfg = make_config(family, **opts).fit(ds)
    ref = data.fit_energy_reference(ds, method="average")  # one molecule: least squares is undetermined
    return Potential(cfg, ref, *fit_scale_shift(ds, ref)), ref


def timed(fn, *args, cpu: list | None = None):
    """(wall seconds, output); the process CPU time (all threads) of the call is appended to ``cpu``."""
    c, t = time.process_time(), time.perf_counter()
    out = fn(*args)
    jax.block_until_ready(out)
    wall = time.perf_counter() - t
    if cpu is not None:
        cpu.append(time.process_time() - c)
    return wall, out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--label", default="after", help="key of this measurement in the JSON (before / after)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--n-batches", type=int, default=10, help="distinct real batches cycled through")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10, help="steps of each model per round")
    ap.add_argument("--latency-calls", type=int, default=50, help="calls of each model per round")
    ap.add_argument("--molecule", default="ethanol")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "so3krates_step.json"))
    a = ap.parse_args(argv)
    ds = data.read(SHARED / "rmd17" / f"rmd17_{a.molecule}_train_01.npz")
    pots = {n: build(n, ds) for n in MODELS}
    ref = pots["schnet"][1]
    loader = GraphLoader(ds, 5.0, a.batch, seed=0, energy_offset=ref.energy(ds))
    it = loader.epoch(0)
    batches = [next(it) for _ in range(a.n_batches)]
    one = next(GraphLoader(ds.subset(np.arange(1)), 5.0, 1, shuffle=False).epoch(0))
    tc = TrainingConfig(max_steps=10_000, batch_size=a.batch)
    res = {"models": {}}
    steps, states, efs = {}, {}, {}
    for n, (pot, _) in pots.items():
        params = pot.init(jax.random.PRNGKey(0), batches[0])
        ef_params = jax.tree.map(jnp.copy, params)  # the train step donates the state's buffers
        r = {"config": pot.model.config_view(), "n_parameters": int(sum(np.size(x) for x in jax.tree.leaves(params)))}
        ef = jax.jit(pot.__call__)
        t, _ = timed(ef, ef_params, one)
        r["energy_forces_compile_s"] = t
        r["energy_forces_kernels"] = kernel_counts(ef.lower(ef_params, one).compile().as_text())
        efs[n] = (ef, ef_params)
        if n != "so3krates_f132":
            opt = make_optimizer(tc, 100)
            step = make_train_step(pot, opt, tc.beta, 0.0, tc.ema_decay)
            state = init_state(params, opt.init(params))
            compiled = step.lower(state, batches[0]).compile()
            r["train_step_kernels"] = kernel_counts(compiled.as_text())
            r["train_step_cost"] = xla_cost(compiled)
            t, (state, loss, _) = timed(step, state, batches[0])
            r["train_step_compile_s"] = t
            steps[n], states[n] = step, state
        res["models"][n] = r
    # interleaved timing: A B A B …
    step_t = {n: [] for n in steps}
    step_cpu = {n: [] for n in steps}
    lat_t = {n: [] for n in efs}
    k = 0
    for _ in range(a.rounds):
        for n in steps:
            for i in range(a.steps):
                t, (states[n], loss, _) = timed(steps[n], states[n], batches[(k + i) % len(batches)], cpu=step_cpu[n])
                step_t[n].append(t)
        k += a.steps
        for n, (ef, params) in efs.items():
            for _ in range(a.latency_calls):
                lat_t[n].append(timed(ef, params, one)[0])
    for n in steps:
        res["models"][n]["train_step_ms_median"] = 1e3 * float(np.median(step_t[n]))
        res["models"][n]["train_step_ms_quartiles"] = [1e3 * float(q) for q in np.percentile(step_t[n], [25, 75])]
        res["models"][n]["train_step_cpu_ms_median"] = 1e3 * float(np.median(step_cpu[n]))
    for n in efs:
        res["models"][n]["energy_forces_1_molecule_ms_median"] = 1e3 * float(np.median(lat_t[n]))
    m = res["models"]
    res["ratios"] = {
        "train_step_so3krates_over_schnet": m["so3krates"]["train_step_ms_median"]
        / m["schnet"]["train_step_ms_median"],
        "train_step_cpu_time_so3krates_over_schnet": m["so3krates"]["train_step_cpu_ms_median"]
        / m["schnet"]["train_step_cpu_ms_median"],
        "latency_so3krates_over_schnet": m["so3krates"]["energy_forces_1_molecule_ms_median"]
        / m["schnet"]["energy_forces_1_molecule_ms_median"],
        "train_step_flops_so3krates_over_schnet": m["so3krates"]["train_step_cost"]["gflop"]
        / m["schnet"]["train_step_cost"]["gflop"],
        "train_step_bytes_so3krates_over_schnet": m["so3krates"]["train_step_cost"]["bytes_accessed_gb"]
        / m["schnet"]["train_step_cost"]["bytes_accessed_gb"],
        "train_step_kernels_so3krates_over_schnet": m["so3krates"]["train_step_kernels"]["thunks"]
        / m["schnet"]["train_step_kernels"]["thunks"],
    }
    res["per_round_step_ratio_median"] = float(
        np.median(
            [
                np.median(step_t["so3krates"][i : i + a.steps]) / np.median(step_t["schnet"][i : i + a.steps])
                for i in range(0, len(step_t["schnet"]), a.steps)
            ]
        )
    )
    try:
        commit = subprocess.run(
            ["git", "-C", str(Path(so3lib.__file__).parents[1]), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        commit = None
    res.update(
        {
            "command": "PYTHONPATH=<tree> python benchmarks/so3krates_step.py " + " ".join(argv or sys.argv[1:]),
            "so3lib_tree": str(Path(so3lib.__file__).parents[1]),
            "so3lib_commit": commit,
            "machine": platform.platform(),
            "cpu_count": os.cpu_count(),
            "load_average_at_end": list(os.getloadavg()),
            "jax": jax.__version__,
            "xla_flags": os.environ.get("XLA_FLAGS"),
            "batch": a.batch,
            "molecule": a.molecule,
            "rounds": a.rounds,
            "steps_per_round": a.steps,
            "padded_shape": list(loader.shapes_seen),
        }
    )
    out = Path(a.out)
    allres = json.loads(out.read_text()) if out.exists() else {}
    allres[a.label] = res
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(allres, indent=2, default=str))
    for n, r in m.items():
        print(
            f"{n}: step {r.get('train_step_ms_median', float('nan')):.1f} ms, E+F 1 molecule "
            f"{r['energy_forces_1_molecule_ms_median']:.2f} ms, kernels step {r.get('train_step_kernels')}, "
            f"E+F {r['energy_forces_kernels']}"
        )
    print(json.dumps(res["ratios"], indent=1), "\nper-round step ratio", res["per_round_step_ratio_median"])
    print(f"wrote {out} [{a.label}]")


if __name__ == "__main__":
    main()
