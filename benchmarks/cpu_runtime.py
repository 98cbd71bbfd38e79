"""Where the CPU time of a jitted train step goes, and what XLA's CPU thread settings and glibc malloc's change
(issue #18: "a third of so3lib's CPU time is spent in the kernel").

For each setting (``VARIANTS``: XLA_FLAGS, glibc malloc's tunables), a fresh child process builds SchNet F=128
T=3 (or SO3krates F=128 L=3 T=3) on real rMD17 ethanol batches (split 01 train file, batch 32, pre-built),
compiles the train step, then times ``--steps`` steps: wall time per step and the process's user and system CPU
time per step (``resource.getrusage``: all threads). The children run interleaved in rotating rounds (A B C,
B C A, …) and the figures are medians over rounds, so the ratios are measured side by side. Writes JSON.

usage: PYTHONPATH=. python benchmarks/cpu_runtime.py [--model schnet] [--rounds 4] [--steps 40]
           [--out benchmarks/results/cpu_runtime.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SO3LIB_SHARED_DATA", ROOT.parent / "shared" / "data"))
# name: the environment of the child (XLA_FLAGS, glibc malloc's tunables)
VARIANTS = {
    "default": {},
    "eigen single-threaded": {"XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"},
    # glibc returns large blocks (≥ 128 KiB) to the kernel at every free (mmap/munmap), so each step faults its
    # buffers in again; with these thresholds freed memory stays in the heap and is reused
    "malloc keeps freed memory": {"MALLOC_MMAP_THRESHOLD_": str(2**25), "MALLOC_TRIM_THRESHOLD_": str(2**31 - 1)},
    # no mmap at all: the step's temporaries (one block above the 32 MiB largest threshold) come from the heap
    "malloc never maps": {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**31 - 1)},
    # the same (no mmap, no trim) set at run time by the so3lib command (so3lib.cli.host_memory.keep_freed_memory)
    "so3lib command (mallopt)": {"SO3LIB_BENCH_MALLOPT": "1"},
}
MODELS = {
    "schnet": ("schnet", {"n_atom_basis": 128, "n_interactions": 3, "n_rbf": 20, "cutoff": 5.0}),
    "so3krates": ("so3krates", {"features": 128, "l_max": 3, "layers": 3, "heads": 4, "cutoff": 5.0}),
}


def child(model: str, steps: int, batch: int) -> dict:
    """One measurement in this process: {step_ms, user_ms_per_step, sys_ms_per_step, compile_s}."""
    if os.environ.get("SO3LIB_BENCH_MALLOPT") == "1":
        from so3lib.cli.host_memory import keep_freed_memory

        assert keep_freed_memory(), "mallopt was not applied"
    import jax

    import so3lib.data as data
    from so3lib.graph import GraphLoader
    from so3lib.models import make_config
    from so3lib.potential import Potential, fit_scale_shift
    from so3lib.training.config import TrainingConfig
    from so3lib.training.optim import make_optimizer
    from so3lib.training.state import init_state
    from so3lib.training.step import make_train_step

    ds = data.read(SHARED / "rmd17" / "rmd17_ethanol_train_01.npz")
    family, opts = MODELS[model]
    ref = data.fit_energy_reference(ds, method="average")  # one molecule
    pot = Potential(make_config(family, **opts).fit(ds), ref, *fit_scale_shift(ds, ref))
    it = GraphLoader(ds, 5.0, batch, seed=0, energy_offset=ref.energy(ds)).epoch(0)
    batches = [next(it) for _ in range(8)]
    tc = TrainingConfig(max_steps=10_000, batch_size=batch)
    opt = make_optimizer(tc, 100)
    step = make_train_step(pot, opt, tc.beta, 0.0, tc.ema_decay)
    params = pot.init(jax.random.PRNGKey(0), batches[0])
    state = init_state(params, opt.init(params))
    t = time.perf_counter()
    state, loss, _ = step(state, batches[0])
    jax.block_until_ready(loss)
    compile_s = time.perf_counter() - t
    for b in batches[1:4]:  # warm
        state, loss, _ = step(state, b)
    jax.block_until_ready(loss)
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for i in range(steps):
        state, loss, _ = step(state, batches[i % len(batches)])
    jax.block_until_ready(loss)
    wall, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
    return {
        "step_ms": 1e3 * wall / steps,
        "user_ms_per_step": 1e3 * (r1.ru_utime - r0.ru_utime) / steps,
        "sys_ms_per_step": 1e3 * (r1.ru_stime - r0.ru_stime) / steps,
        "compile_s": compile_s,
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=list(MODELS), default="schnet")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cpu_runtime.json"))
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(child(a.model, a.steps, a.batch)))
        return {}
    names, runs = list(VARIANTS), {n: [] for n in VARIANTS}
    load = [os.getloadavg()]
    for r in range(a.rounds):
        for n in names[r % len(names) :] + names[: r % len(names)]:
            env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", **VARIANTS[n]}
            cmd = [sys.executable, __file__, "--child", "--model", a.model, "--steps", str(a.steps)]
            out = subprocess.run([*cmd, "--batch", str(a.batch)], env=env, capture_output=True, text=True)
            if out.returncode:
                raise SystemExit(f"cpu_runtime: the {n!r} child failed:\n{out.stderr[-3000:]}")
            runs[n].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(n, runs[n][-1], flush=True)
    load.append(os.getloadavg())
    med = {n: {k: float(np.median([x[k] for x in v])) for k in v[0]} for n, v in runs.items()}
    for m in med.values():
        m["cpu_ms_per_step"] = m["user_ms_per_step"] + m["sys_ms_per_step"]
        m["sys_share_of_cpu"] = m["sys_ms_per_step"] / m["cpu_ms_per_step"]
        m["cores_busy"] = m["cpu_ms_per_step"] / m["step_ms"]
    base = med["default"]["step_ms"]
    res = {
        "command": "python benchmarks/cpu_runtime.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": {"name": a.model, **MODELS[a.model][1]},
        "batch": a.batch,
        "steps_per_round": a.steps,
        "rounds": a.rounds,
        "machine": platform.platform(),
        "cpu_count": os.cpu_count(),
        "load_average_before_after": load,
        "variants": {
            n: {"xla_flags": VARIANTS[n], **med[n], "step_time_ratio_to_default": med[n]["step_ms"] / base}
            for n in names
        },
        "all_rounds": runs,
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
    for n in names:
        v = res["variants"][n]
        ratio = v["step_time_ratio_to_default"]
        cpu = (
            f"user {v['user_ms_per_step']:6.1f}  sys {v['sys_ms_per_step']:6.1f} ({100 * v['sys_share_of_cpu']:.0f} %)"
        )
        print(f"{n:26s} {v['step_ms']:7.1f} ms/step  {cpu}  {v['cores_busy']:.2f} cores  ×{ratio:.2f}")
    return res


if __name__ == "__main__":
    main()
