"""Peak memory per process of multi-process training against the number of conformations, and whether the
streamed input keeps ahead of the step.

The stores are SYNTHETIC, in SPICE's packed-store layout, built from REAL frames: the 50 conformations of the
bundled SPICE 1.1.4 molecule (27 atoms, PubChem set) tiled to N conformations, positions + N(0, 0.005 Å)
noise, the real labels kept (so physically inconsistent: used only to measure memory and speed). For each N
two processes (one CPU device each, gloo collectives, coordinator on localhost) train a tiny SchNet for
``--steps`` steps with global batch ``--batch-size`` through `so3lib.training.train` on a split of the
memory-mapped store, as ``so3lib spice`` does (the split's indices passed along and saved by process 0;
validation and test: a fixed 256 conformations each, so their cost does not grow with N; process 0 evaluates
the test set, its parity plots and predictions). Each process samples /proc/self/status every 20 ms: the peak
of RssAnon (its own heap, XLA's included: what must stay flat) and VmHWM (all resident memory, including file
pages of the memory map, which the kernel may drop); and traces its Python/numpy allocations (tracemalloc,
one frame: the peak of what numpy and Python hold, free of the allocator's and XLA's noise).
``input_wait_s``: the time the step waited for its batch (the loader's threads read the frames and build
neighbour lists ahead); ``input_wait_fraction`` = input_wait_s / train_time_s. The stores are deleted at the
end. Memory does not depend on the machine's load; the times do (tracemalloc slows the host side a little,
so the input wait is if anything overstated).

usage: python benchmarks/multiprocess_memory.py [--sizes 10000 100000 1000000] [--steps 30] [--batch-size 32]
           [--work /tmp/so3lib_mp_bench] [--out benchmarks/results/multiprocess_memory.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from work_folder import fresh_work_folder  # benchmarks/

ROOT = Path(__file__).resolve().parents[1]
CHILD = r"""
import json, sys, threading, time, tracemalloc
tracemalloc.start(1)
peak = {"anon": 0}
def status():
    out = {}
    for line in open("/proc/self/status"):
        k, v = line.split(":", 1)
        if k in ("VmHWM", "RssAnon"):
            out[k] = int(v.split()[0]) * 1024
    return out
def sample():
    while True:
        peak["anon"] = max(peak["anon"], status()["RssAnon"])
        time.sleep(0.02)
threading.Thread(target=sample, daemon=True).start()
store, out, port, pid, steps, batch = sys.argv[1:7]
from so3lib.training import distributed
distributed.initialize(f"127.0.0.1:{port}", 2, int(pid), timeout_s=300)
import numpy as np
from so3lib.data.store import open_store
from so3lib.models import make_config
from so3lib.training import RunConfig, train
t0 = time.perf_counter()
view = open_store(store)
perm = np.random.default_rng(0).permutation(len(view))
splits = {"val": np.sort(perm[:256]), "test": np.sort(perm[256:512]), "train": np.sort(perm[512:])}
del perm
tr, va, te = (view.subset(splits[k]) for k in ("train", "val", "test"))
cfg = RunConfig(model=make_config("schnet", n_atom_basis=16, n_interactions=1),
                training={"batch_size": int(batch), "max_steps": int(steps), "eval_every_steps": int(steps),
                          "checkpoint_every_steps": int(steps), "n_devices": 2, "eval_batch_size": 64,
                          "early_stopping_patience": None},
                data={"energy_reference": "average"})
res = train(cfg, tr, va, te, out_dir=out, progress=False, splits=splits)
r = {"process_id": int(pid), "seconds": time.perf_counter() - t0, "input_wait_s": res["input_wait_s"],
     "train_time_s": res["train_time_s"], "steps": res["steps"], "n_train": len(tr)}
r["input_wait_fraction"] = r["input_wait_s"] / r["train_time_s"]
if int(pid) == 0:
    r.update(steps_per_s=res["steps_per_s"], compile_time_s=res["compile_time_s"])
peak["anon"] = max(peak["anon"], status()["RssAnon"])
r.update(peak_anon_mb=peak["anon"] / 2**20, peak_rss_mb=status()["VmHWM"] / 2**20,
         heap_peak_mb=tracemalloc.get_traced_memory()[1] / 2**20)
print("RESULT " + json.dumps(r), flush=True)
"""


def synthetic_store(n_conf: int, dest: Path, seed: int = 0) -> Path:
    """A packed store of ``n_conf`` conformations tiled from the bundled SPICE sample's real frames."""
    from so3lib.data import bundled_path
    from so3lib.data.samples import SPICE_SAMPLE
    from so3lib.data.store import convert_spice, read_manifest

    real = convert_spice(bundled_path(SPICE_SAMPLE), dest.parent / "real", neutral_only=False, progress=False)
    m = read_manifest(real)
    f0, a0 = m["frames"], m["atoms"]
    n_at = a0 // f0  # one molecule kept: every frame has the same atoms
    pos = np.fromfile(real / "positions.bin").reshape(f0, n_at, 3)
    frc = np.fromfile(real / "forces.bin").reshape(f0, n_at, 3)
    num = np.fromfile(real / "numbers.bin", np.int8).reshape(f0, n_at)
    energy = np.fromfile(real / "energy.bin")
    comp = np.fromfile(real / "composition.bin", np.int16).reshape(f0, -1)
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    names = ("numbers", "positions", "forces", "energy", "molecule", "frame", "composition")
    files = {k: open(dest / f"{k}.bin", "wb") for k in names}
    chunk = 20_000
    try:
        for start in range(0, n_conf, chunk):
            k = np.arange(start, min(start + chunk, n_conf)) % f0
            files["positions"].write((pos[k] + rng.normal(0, 0.005, pos[k].shape)).tobytes())
            files["forces"].write(frc[k].tobytes())
            files["numbers"].write(num[k].tobytes())
            files["energy"].write(energy[k].tobytes())
            files["molecule"].write(np.zeros(len(k), np.int32).tobytes())
            files["frame"].write(k.astype(np.int32).tobytes())
            files["composition"].write(comp[k].tobytes())
    finally:
        for fh in files.values():
            fh.close()
    (np.arange(n_conf + 1, dtype=np.int64) * n_at).tofile(dest / "offsets.bin")
    m.update(frames=n_conf, atoms=n_conf * n_at)
    m["molecules"][0]["conformers"] = n_conf
    m["fingerprint"]["source"] = f"synthetic: {n_conf} conformations tiled from {m['fingerprint']['source']}"
    (dest / "manifest.json").write_text(json.dumps(m))
    shutil.rmtree(real)
    return dest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_pair(store: Path, work: Path, steps: int, batch: int) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    port, out = free_port(), work / "run"
    shutil.rmtree(out, ignore_errors=True)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, str(store), str(out), str(port), str(i), str(steps), str(batch)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    results = []
    for p in procs:
        o, e = p.communicate(timeout=1200)
        line = next((x for x in o.splitlines() if x.startswith("RESULT ")), None)
        if p.returncode or line is None:
            raise RuntimeError(f"child failed ({p.returncode}):\n{o[-2000:]}\n{e[-4000:]}")
        results.append(json.loads(line[7:]))
    shutil.rmtree(out, ignore_errors=True)
    return results


def main(argv=None) -> dict:
    from tqdm.auto import tqdm

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--work", type=Path, default=Path("/tmp/so3lib_mp_bench"))
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "multiprocess_memory.json")
    a = ap.parse_args(argv)
    rows = []
    fresh_work_folder(a.work)
    try:
        for n in tqdm(a.sizes, desc="sizes"):
            t0 = time.perf_counter()
            store = synthetic_store(n, a.work / "store")
            build_s = time.perf_counter() - t0
            size_mb = sum(f.stat().st_size for f in store.iterdir()) / 2**20
            for r in run_pair(store, a.work, a.steps, a.batch_size):
                rows.append({"conformations": n, "store_mb": size_mb, "store_build_s": build_s, **r})
            shutil.rmtree(store)
            print(json.dumps(rows[-2:]), flush=True)
    finally:
        shutil.rmtree(a.work, ignore_errors=True)  # made and marked by fresh_work_folder above
    out = {
        "command": "python benchmarks/multiprocess_memory.py " + " ".join(argv or sys.argv[1:]),
        "what": "2 processes x 1 CPU device, streamed training (validation and test: 256 conformations each) on a "
        "SYNTHETIC SPICE-layout store tiled from the 50 real frames of the bundled SPICE 1.1.4 molecule (27 atoms, "
        "positions + N(0, 0.005 A) noise); peak memory per process against the conformations in the store",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load_avg_1min": os.getloadavg()[0]},
        "note": "memory does not depend on the load; the times (steps/s, input wait) do",
        "steps": a.steps,
        "global_batch_size": a.batch_size,
        "rows": rows,
        "slope_bytes_per_conformation": slopes(rows),
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=2) + "\n")
    plot(out, a.out.with_suffix(".png"))
    return out


def slopes(rows: list[dict]) -> dict:
    """Least-squares slope of each process's peak memory against the conformations (bytes per conformation)."""
    out = {}
    for pid in sorted({r["process_id"] for r in rows}):
        r = [x for x in rows if x["process_id"] == pid]
        n = np.array([x["conformations"] for x in r], float)
        if len(set(n)) < 2:
            continue
        out[f"process_{pid}"] = {
            k: float(np.polyfit(n, [x[k] * 2**20 for x in r], 1)[0]) for k in ("peak_anon_mb", "heap_peak_mb")
        }
    return out


def plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.2))
    for pid, mark in ((0, "o"), (1, "s")):
        r = [x for x in out["rows"] if x["process_id"] == pid]
        n = [x["conformations"] for x in r]
        ax.plot(n, [x["peak_anon_mb"] for x in r], marker=mark, label=f"process {pid}: heap incl. XLA (peak RssAnon)")
        ax.plot(n, [x["peak_rss_mb"] for x in r], marker=mark, ls="--", label=f"process {pid}: VmHWM (+ mapped pages)")
        ax.plot(n, [x["heap_peak_mb"] for x in r], marker=mark, ls=":", label=f"process {pid}: numpy+Python (traced)")
        bx.plot(n, [100 * x["input_wait_fraction"] for x in r], marker=mark, label=f"process {pid}")
    for a_, t in ((ax, "peak memory per process (MiB)"), (bx, "step waiting for its input (% of training time)")):
        a_.set_xscale("log")
        a_.set_xlabel("conformations in the store")
        a_.set_title(t, fontsize=10)
        a_.legend(fontsize=7)
    ax.set_ylim(bottom=0)
    bx.set_ylim(0, 100)
    fig.suptitle(
        f"2 processes, {out['steps']} steps, global batch {out['global_batch_size']} "
        "(synthetic SPICE-layout store from real frames)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
