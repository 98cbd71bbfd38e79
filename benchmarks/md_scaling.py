"""MD cost against system size: ms per step of the on-device (jax-md) engine on bcc Li supercells from ~10² to
~10⁵ atoms, with jax-md's cell list (fractional coordinates; every size from 4 cells per side on) and with the
all-pairs search (up to --max-all-pairs atoms), and the log–log slope of ms/step against N (1 = linear).

A small freshly initialised float32 SchNet (speed does not depend on training), NVE at 300 K, dt 1 fs, skin
0.5 Å (so the neighbour list is rebuilt now and then, as in production), the lattice rattled by 0.1 Å, list capacity
×1.5 (a reallocation inside the timed chunk would time a recompilation: see neighbour_reallocations). Each point
runs 2·k steps in chunks of k; the first chunk (compilation) is not timed, ms/step = wall of the second chunk / k.
Writes JSON and a PNG.

usage: python benchmarks/md_scaling.py [--repeats 4 6 10 16 24 37] [--max-all-pairs 2000]
           [--out benchmarks/results/md_scaling.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import jax
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MODEL = {"n_atom_basis": 16, "n_interactions": 1, "cutoff": 4.0}
LATTICE_A = 3.44  # bcc Li (Å)


def potential(atoms):
    from so3lib.data import Dataset, fit_energy_reference
    from so3lib.graph import NeighbourTable, build_batch
    from so3lib.models import make_config
    from so3lib.potential import Potential

    n = len(atoms)
    ds = Dataset(
        np.asarray(atoms.numbers, np.int32),
        np.asarray(atoms.positions, float),
        np.array([0, n]),
        atoms.cell.array[None],
        np.ones((1, 3), bool),
        np.array([-1.9 * n]),
        None,
        None,
        {"frame": np.zeros(1, int), "source": np.array(["bcc Li"], object)},
    )
    cfg = make_config("schnet", **MODEL).fit(ds)
    ref = fit_energy_reference(ds, method="average")
    pot = Potential(cfg, ref, 0.1, 0.0)
    g = build_batch(ds, NeighbourTable.build(ds, pot.cutoff), [0], None, np.float32)
    return pot, pot.init(jax.random.PRNGKey(0), g)


def steps_for(n: int) -> int:
    return 30 if n < 10_000 else 12 if n < 50_000 else 5


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, nargs="+", default=[4, 6, 10, 16, 24, 37])
    ap.add_argument("--max-all-pairs", type=int, default=2000)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "md_scaling.json")
    ap.add_argument("--replot", action="store_true", help="recompute the slopes and the plot of --out, no runs")
    a = ap.parse_args(argv)
    if a.replot:
        out = write(a.out, json.loads(a.out.read_text())["rows"], json.loads(a.out.read_text()))
        plot(out, a.out.with_suffix(".png"))
        print(json.dumps(out["slopes"]))
        return out
    from ase.build import bulk
    from tqdm.auto import tqdm

    from so3lib.md import MDConfig, run_md
    from so3lib.md.engine import cells_per_side
    from so3lib.md.memory import md_memory_bytes

    unit = bulk("Li", "bcc", a=LATTICE_A, cubic=True)
    pot, params = potential(unit.repeat(4))
    rows = []
    jobs = []
    for r in a.repeats:
        n = len(unit) * r**3
        fits = cells_per_side(unit.cell.array * r, pot.cutoff + 0.5) >= 4
        if fits:
            jobs.append((r, True))
        if n <= a.max_all_pairs or not fits:
            jobs.append((r, False))
    for r, cl in tqdm(jobs, desc="MD scaling", unit="size"):
        atoms = unit.repeat(r)
        atoms.rattle(0.1, seed=0)  # a thermalised crystal: the list's capacity sees its spread of neighbour counts
        n, k = len(atoms), steps_for(len(atoms))
        cfg = MDConfig(
            ensemble="nve",
            temperature_k=300,
            steps=2 * k,
            dt_fs=1.0,
            save_every=k,
            skin_angstrom=0.5,
            capacity_multiplier=1.5,
            cell_list=cl,
        )
        t = time.perf_counter()
        res = run_md(pot, params, atoms, cfg, progress=False)
        total = time.perf_counter() - t
        row = {
            "n_atoms": n,
            "search": "cell list" if cl else "all pairs",
            "timed_steps": k,
            "ms_per_step": 1e3 * res.wall_s / k,
            "us_per_atom_step": 1e6 * res.wall_s / k / n,
            "first_chunk_s": res.compile_s,
            "total_s": total,
            "neighbour_reallocations": res.reallocations,
            "memory_estimate_gb": md_memory_bytes(n, atoms.get_volume(), pot.cutoff + 0.5, cl, 4, 16, 1) / 1e9,
            "total_energy_drift_mev_per_atom": float(1e3 * np.ptp(res.total_ev) / n),
            "load_average_1min": os.getloadavg()[0],  # a shared machine: other processes slow the timings
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
        write(a.out, rows)
    out = write(a.out, rows)
    plot(out, a.out.with_suffix(".png"))
    print(json.dumps(out["slopes"]))
    print(f"wrote {a.out} and {a.out.with_suffix('.png')}")
    return out


def slope(rows: list, search: str, n_from: int = 0) -> dict | None:
    """Least-squares slope of log(ms/step) against log(N) for one search (sizes ≥ ``n_from``), or None with fewer
    than 3 sizes."""
    pts = [(r["n_atoms"], r["ms_per_step"]) for r in rows if r["search"] == search and r["n_atoms"] >= n_from]
    if len(pts) < 3:
        return None
    n, ms = np.log(np.array(pts, float)).T
    return {"slope": float(np.polyfit(n, ms, 1)[0]), "n_min": round(np.exp(n.min())), "n_max": round(np.exp(n.max()))}


def write(path: Path, rows: list, old: dict | None = None) -> dict:
    """Results so far (rewritten after every row, so a long run keeps what it measured)."""
    from so3lib.md.engine import CELL_LIST_MIN_ATOMS

    out = {
        "device": old["device"] if old else str(jax.devices()[0]),
        "platform": old["platform"] if old else platform.platform(),
        "cpus": old["cpus"] if old else os.cpu_count(),
        "jax": old["jax"] if old else jax.__version__,
        "model": {"name": "schnet", **MODEL, "dtype": "float32"},
        "system": f"bcc Li, a = {LATTICE_A} Å, NVE 300 K, dt 1 fs, skin 0.5 Å",
        "slopes": {
            **{s: slope(rows, s) for s in ("cell list", "all pairs")},
            f"cell list, N ≥ {CELL_LIST_MIN_ATOMS} (the automatic range)": slope(
                rows, "cell list", CELL_LIST_MIN_ATOMS
            ),
        },
        "rows": rows,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2))
    return out


def plot(out: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for s, m in (("cell list", "o-"), ("all pairs", "s--")):
        pts = sorted((r["n_atoms"], r["ms_per_step"]) for r in out["rows"] if r["search"] == s)
        if pts:
            fit = out["slopes"][s]
            label = s + (f" (slope {fit['slope']:.2f})" if fit else "")
            ax.loglog(*zip(*pts), m, label=label)
    n = np.array([r["n_atoms"] for r in out["rows"]], float)
    ms = np.array([r["ms_per_step"] for r in out["rows"]], float)
    ref = np.geomspace(n.min(), n.max(), 10)
    ax.loglog(ref, ms[np.argmax(n)] * ref / n.max(), ":", color="gray", label="∝ N")
    ax.set_xlabel("atoms")
    ax.set_ylabel("ms per MD step")
    ax.set_title(f"jax-md engine, SchNet F={MODEL['n_atom_basis']}, bcc Li ({out['device']})", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
