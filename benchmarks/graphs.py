"""Graph-building throughput (structures/s) on real data: neighbour lists (vesin and matscipy) and padded
batch assembly, for rMD17 aspirin (21 atoms) and periodic Li (mlearn, 2-84 atoms). Writes JSON.

usage: python benchmarks/graphs.py [--cutoff 5.0] [--batch 32] [--out benchmarks/results/graphs.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import so3lib.data as data  # noqa: E402
from so3lib.graph import BudgetLadder, GraphLoader, NeighbourTable, neighbour_list  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"


def bench_nl(ds, cutoff, backend, repeat=2):
    best = np.inf
    for _ in range(repeat):
        t0 = time.perf_counter()
        n_edges = 0
        for f in range(len(ds)):
            a, b = ds.offsets[f], ds.offsets[f + 1]
            s, _, _ = neighbour_list(ds.positions[a:b], ds.cell[f], ds.pbc[f], cutoff, backend=backend)
            n_edges += len(s)
        best = min(best, time.perf_counter() - t0)
    return {"structures_per_s": len(ds) / best, "edges_per_s": n_edges / best, "seconds": best}


def bench_batches(ds, cutoff, batch):
    table = NeighbourTable.build(ds, cutoff)
    ladder = BudgetLadder.from_counts(ds.n_atoms, table.n_edges, batch)
    loader = GraphLoader(ds, cutoff, batch, table=table, ladder=ladder, device_put=False)
    list(loader.epoch(0))
    t0 = time.perf_counter()
    n = 0
    for ep in range(1, 4):
        for _ in loader.epoch(ep):
            n += 1
    dt = time.perf_counter() - t0
    real_nodes = 3 * int(ds.offsets[-1])
    padded_nodes = sum(r.n_node for r in ladder.rungs)  # for information only
    return {
        "batches_per_s": n / dt,
        "structures_per_s": 3 * len(ds) / dt,
        "distinct_shapes": len(loader.shapes_seen),
        "ladder": [(r.n_graph, r.n_node, r.n_edge) for r in ladder.rungs],
        "real_nodes": real_nodes,
        "_": padded_nodes,
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--cutoff", type=float, default=5.0)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "graphs.json"))
    a = ap.parse_args(argv)
    sets = {
        "rmd17_aspirin": data.read(SHARED / "rmd17" / "rmd17_aspirin_test_01.npz"),
        "li_mlearn_periodic": data.read(SHARED / "materials" / "li_mlearn_training.json"),
    }
    res = {
        "cutoff_angstrom": a.cutoff,
        "batch_size": a.batch,
        "machine": platform.platform(),
        "processor": platform.processor(),
        "results": {},
    }
    for name, ds in sets.items():
        r = {"structures": len(ds), "atoms_mean": float(ds.n_atoms.mean())}
        for backend in ("vesin", "matscipy"):
            try:
                r[f"neighbour_list_{backend}"] = bench_nl(ds, a.cutoff, backend)
            except ImportError as exc:
                r[f"neighbour_list_{backend}"] = {"error": str(exc)}
        b = bench_batches(ds, a.cutoff, a.batch)
        b.pop("_")
        r["batch_assembly"] = b
        res["results"][name] = r
        print(
            f"{name}: vesin {r['neighbour_list_vesin']['structures_per_s']:.0f} str/s, matscipy "
            f"{r['neighbour_list_matscipy'].get('structures_per_s', float('nan')):.0f} str/s; padded batches "
            f"{b['structures_per_s']:.0f} str/s ({b['distinct_shapes']} shapes)"
        )
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2))
    print(f"wrote {a.out}")
    return res


if __name__ == "__main__":
    main()
