"""Summarise a data file: frames, atoms, elements, units-converted energy/force statistics, the per-element
energy reference fit and its residual.

usage: python -m experiments.inspect PATH [--format FMT] [--json]
(with no PATH: the bundled rMD17 ethanol sample)
"""

from __future__ import annotations

import argparse
import json

import so3lib.data as data


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("path", nargs="?", default=None)
    ap.add_argument("--format", default=None, choices=data.FORMATS)
    ap.add_argument("--json", action="store_true", help="print JSON only")
    a = ap.parse_args(argv)
    path = a.path or data.bundled_path(data.samples.RMD17_ETHANOL_TRAIN)
    ds = data.read(path, a.format)
    s = ds.summary()
    ref = data.fit_energy_reference(ds)
    s["format"] = a.format or data.detect_format(path)
    s["energy_reference"] = ref.to_dict()
    if a.json:
        print(json.dumps(s, indent=2))
        return s
    print(f"{path}  [{s['format']}]")
    print(
        f"  frames {s['frames']}, atoms {s['atoms_min']}-{s['atoms_max']} (mean {s['atoms_mean']:.1f}), "
        f"molecules/groups {s['molecules']}, periodic frames {s['periodic_frames']}"
    )
    print("  elements (atoms): " + ", ".join(f"Z={z}: {c}" for z, c in s["elements"].items()))
    if "energy_ev_mean" in s:
        print(f"  energy: {s['energy_ev_min']:.4f} .. {s['energy_ev_max']:.4f} eV (mean {s['energy_ev_mean']:.4f} eV)")
    if "forces_ev_per_a_rms" in s:
        print(
            f"  forces: RMS {s['forces_ev_per_a_rms']:.4f} eV/Å, max |F| component {s['forces_ev_per_a_max']:.4f} eV/Å"
        )
    if "frames_with_stress" in s:
        print(f"  stress labels on {s['frames_with_stress']} frames")
    print(
        f"  per-element reference ({ref.method}): "
        + ", ".join(f"Z={z}: {e:.4f} eV" for z, e in zip(ref.species, ref.energies_ev))
    )
    print(
        f"  per-atom energy std: raw {1e3 * ref.raw_std_per_atom_ev:.3f} meV/atom, after the reference "
        f"{1e3 * ref.residual_std_per_atom_ev:.3f} meV/atom"
    )
    return s


if __name__ == "__main__":
    main()
