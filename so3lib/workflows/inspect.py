"""A data file summarised: frames, atoms, elements, energy and force statistics in Å/eV, and the per-element
energy reference with its residual (or why it is not determined)."""

from __future__ import annotations

from pydantic import Field

from so3lib.workflows.common import Format, LabelKeys


class InspectOptions(LabelKeys):
    """Options of ``so3lib inspect``."""

    path: str | None = Field(None, description="data file (default: the bundled rMD17 ethanol sample)")
    format: Format | None = Field(None, description="file format (default: detected)")
    json_only: bool = Field(False, description="print JSON only")


def run(opts: InspectOptions) -> dict:
    from so3lib import data

    path = opts.path or str(data.bundled_path(data.samples.RMD17_ETHANOL_TRAIN))
    ds = opts.read(path, opts.format)
    s = ds.summary()
    s["path"] = path
    s["format"] = opts.format or data.detect_format(path)
    try:
        s["energy_reference"] = data.fit_energy_reference(ds).to_dict()
    except data.DataError as exc:  # not determined, or no energies: say why
        s["energy_reference"] = None
        s["energy_reference_note"] = str(exc)
        if getattr(exc, "key", None) == "energy" and ds.energy is not None and len(ds):
            try:
                s["energy_reference_average"] = data.fit_energy_reference(ds, method="average").to_dict()
            except data.DataError:
                pass
    return s


def text(s: dict) -> str:
    lines = [
        f"{s['path']}  [{s['format']}]",
        f"  frames {s['frames']}, atoms {s['atoms_min']}-{s['atoms_max']} (mean {s['atoms_mean']:.1f}), "
        f"molecules/groups {s['molecules']}, periodic frames {s['periodic_frames']}",
        "  elements (atoms): " + ", ".join(f"Z={z}: {c}" for z, c in s["elements"].items()),
    ]
    if "energy_ev_mean" in s:
        lines.append(
            f"  energy: {s['energy_ev_min']:.4f} .. {s['energy_ev_max']:.4f} eV (mean {s['energy_ev_mean']:.4f} eV)"
        )
    if "forces_ev_per_a_rms" in s:
        lines.append(
            f"  forces: RMS {s['forces_ev_per_a_rms']:.4f} eV/Å, max |F| component {s['forces_ev_per_a_max']:.4f} eV/Å"
        )
    if "frames_with_stress" in s:
        lines.append(f"  stress labels on {s['frames_with_stress']} frames")
    ref = s.get("energy_reference") or s.get("energy_reference_average")
    if s.get("energy_reference_note"):
        lines.append(f"  least-squares reference: {s['energy_reference_note']}")
    if ref:
        lines.append(
            f"  per-element reference ({ref['method']}): "
            + ", ".join(f"Z={z}: {e:.4f} eV" for z, e in zip(ref["species"], ref["energies_ev"]))
        )
        lines.append(
            f"  per-atom energy std: raw {1e3 * ref['raw_std_per_atom_ev']:.3f} meV/atom, after the reference "
            f"{1e3 * ref['residual_std_per_atom_ev']:.3f} meV/atom"
        )
    return "\n".join(lines)
