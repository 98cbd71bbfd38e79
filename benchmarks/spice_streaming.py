"""Streaming memory and speed: peak RSS against the number of conformations.

A SYNTHETIC SPICE-layout file is built by perturbing the real rMD17 frames (10 molecules, groups of 50
conformations, positions + N(0, 0.01 Å) noise, the real labels kept: physically inconsistent, used only for
this memory and speed test). For each size, in fresh processes: (1) convert it into the packed store
(`convert_spice`), (2) stream one epoch of padded batches from the store (`GraphLoader` over a `DatasetView`:
frames read from disk, neighbour lists in worker threads, batches placed on the device), and, for contrast,
(3) the in-memory path (`filter_spice` + neighbour lists up front) for the smaller sizes. Peak memory is sampled
from /proc/self/status every 20 ms: VmHWM (all resident memory, including file pages of the memory map, which
the kernel can drop) and the peak of RssAnon (the process's own heap: what must not grow).

usage: python benchmarks/spice_streaming.py [--sizes 25000 50000 100000 200000] [--in-memory-max 100000]
           [--rmd17-dir ../shared/data/rmd17] [--work /tmp/so3lib_stream]
           [--out benchmarks/results/spice_streaming.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CHILD = r"""
import json, sys, threading, time
from pathlib import Path
peak = {"anon": 0}
def status():
    out = {}
    for line in open("/proc/self/status"):
        k, v = line.split(":", 1)
        if k in ("VmHWM", "RssAnon", "VmRSS"):
            out[k] = int(v.split()[0]) * 1024
    return out
def sample():
    while True:
        peak["anon"] = max(peak["anon"], status()["RssAnon"])
        time.sleep(0.02)
threading.Thread(target=sample, daemon=True).start()
mode, src, store = sys.argv[1], sys.argv[2], sys.argv[3]
import numpy as np
t0 = time.perf_counter()
res = {}
if mode == "convert":
    from so3lib.data.store import convert_spice
    convert_spice(src, store, progress=False, rebuild=True)
    res["seconds"] = time.perf_counter() - t0
else:
    import jax, jraph
    from so3lib.graph.batching import GraphLoader
    if mode == "stream":
        from so3lib.data.store import open_store
        ds = open_store(store)
    else:
        from so3lib.data.spice import filter_spice
        ds, _ = filter_spice(src)
    t1 = time.perf_counter()
    loader = GraphLoader(ds, 5.0, 64, seed=0)
    t2 = time.perf_counter()
    n = 0
    for g in loader.epoch(0):
        n += int(np.asarray(jraph.get_graph_padding_mask(g)).sum())
    jax.block_until_ready(g)
    res.update(seconds=time.perf_counter() - t0, load_s=t1 - t0, setup_s=t2 - t1, epoch_s=time.perf_counter() - t2,
               structures=n, structures_per_s=n / (time.perf_counter() - t2), batches=len(loader),
               padded_shapes=len(loader.shapes_seen))
peak["anon"] = max(peak["anon"], status()["RssAnon"])
res.update(peak_rss_mb=status()["VmHWM"] / 2**20, peak_anon_mb=peak["anon"] / 2**20)
print("RESULT " + json.dumps(res))
"""


def make_synthetic(rmd17_dir: Path, out: Path, n_conf: int, per_group: int = 50, seed: int = 0) -> Path:
    """SYNTHETIC SPICE-layout HDF5 with ``n_conf`` conformations: perturbed real rMD17 frames (see module doc)."""
    import h5py

    sys.path.insert(0, str(ROOT))
    import so3lib.data as data
    from scripts.make_spice_like import SMILES
    from so3lib import units

    rng = np.random.default_rng(seed)
    mols = []
    for mol in SMILES:
        ds = data.read(rmd17_dir / f"rmd17_{mol}_train_01.npz")
        n = int(ds.n_atoms[0])
        mols.append(
            (mol, ds.numbers[:n], ds.positions.reshape(len(ds), n, 3), ds.energy, ds.forces.reshape(len(ds), n, 3))
        )
    with h5py.File(out, "w") as f:
        done, k = 0, 0
        while done < n_conf:
            mol, z, pos, e, frc = mols[k % len(mols)]
            c = min(per_group, n_conf - done)
            idx = rng.integers(0, len(pos), c)
            g = f.create_group(f"{mol}-{k:06d}")
            g["atomic_numbers"] = z.astype(np.int16)
            g["conformations"] = ((pos[idx] + rng.normal(0, 0.01, pos[idx].shape)) / units.BOHR_ANGSTROM).astype(
                np.float32
            )
            g["dft_total_energy"] = e[idx] / units.HARTREE_EV
            g["dft_total_gradient"] = (-frc[idx] / units.HARTREE_PER_BOHR_EV_PER_ANGSTROM).astype(np.float32)
            g["smiles"] = np.array([SMILES[mol].encode()], dtype=object)
            g["subset"] = np.array([b"SYNTHETIC (perturbed rMD17) streaming benchmark"], dtype=object)
            done += c
            k += 1
    return out


def run_child(mode: str, src: Path, store: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    r = subprocess.run(
        [sys.executable, "-c", CHILD, mode, str(src), str(store)], env=env, capture_output=True, text=True
    )
    line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
    if r.returncode or not line:
        raise RuntimeError(f"{mode} failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
    return json.loads(line[0][7:])


def dir_mb(p: Path) -> float:
    return sum(f.stat().st_size for f in Path(p).rglob("*") if f.is_file()) / 2**20


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[25000, 50000, 100000, 200000])
    ap.add_argument("--in-memory-max", type=int, default=100000, help="largest size also run in memory")
    ap.add_argument("--rmd17-dir", type=Path, default=ROOT.parent / "shared" / "data" / "rmd17")
    ap.add_argument("--work", type=Path, default=Path("/tmp/so3lib_stream"))
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "spice_streaming.json")
    a = ap.parse_args(argv)
    a.work.mkdir(parents=True, exist_ok=True)
    rows = []
    for n in a.sizes:
        src = a.work / f"synthetic_{n}.hdf5"
        if not src.exists():
            t = time.perf_counter()
            make_synthetic(a.rmd17_dir, src, n)
            print(f"wrote SYNTHETIC {src} ({n} conformations) in {time.perf_counter() - t:.1f} s", flush=True)
        store = a.work / f"store_{n}"
        row = {"conformations": n, "hdf5_mb": src.stat().st_size / 2**20}
        row["convert"] = run_child("convert", src, store)
        row["store_mb"] = dir_mb(store)
        row["stream"] = run_child("stream", src, store)
        if n <= a.in_memory_max:
            row["in_memory"] = run_child("memory", src, store)
        print(json.dumps(row), flush=True)
        rows.append(row)
    n = np.array([r["conformations"] for r in rows], float)

    def slope(key, mode):
        y = np.array([r[mode][key] for r in rows if mode in r], float)
        x = np.array([r["conformations"] for r in rows if mode in r], float)
        return float(np.polyfit(x, y * 2**20, 1)[0]) if len(x) > 1 else None

    out = {
        "what": "peak memory of converting and streaming one epoch against the number of conformations "
        "(SYNTHETIC file: perturbed rMD17 frames; batch 64, cutoff 5 Å)",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "rows": rows,
        "bytes_per_conformation": {
            "stream_peak_anon": slope("peak_anon_mb", "stream"),
            "stream_peak_rss": slope("peak_rss_mb", "stream"),
            "convert_peak_anon": slope("peak_anon_mb", "convert"),
            "in_memory_peak_anon": slope("peak_anon_mb", "in_memory"),
        },
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=2))
    plot(out, a.out.with_suffix(".png"))
    print(json.dumps(out["bytes_per_conformation"], indent=2))
    print(f"wrote {a.out}")
    return out


def plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = out["rows"]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for mode, key, style, label in (
        ("stream", "peak_anon_mb", "o-", "streamed epoch: heap (RssAnon)"),
        ("stream", "peak_rss_mb", "o--", "streamed epoch: all resident (incl. mapped file)"),
        ("convert", "peak_anon_mb", "s-", "conversion: heap"),
        ("in_memory", "peak_anon_mb", "^-", "in-memory loader: heap"),
    ):
        pts = [(r["conformations"], r[mode][key]) for r in rows if mode in r]
        if pts:
            x, y = zip(*pts)
            ax.plot(x, y, style, label=label)
    ax.set_xlabel("conformations (SYNTHETIC, perturbed rMD17)")
    ax.set_ylabel("peak memory (MiB)")
    ax.set_title("SPICE pipeline: peak memory against dataset size")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
