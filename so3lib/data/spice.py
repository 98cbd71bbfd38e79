"""SPICE preprocessing as MACE-OFF23 did it: keep the elements H C N O F P S Cl Br I, neutral molecules only
(total charge from the formal charges in the SMILES), and drop conformers whose largest force component
exceeds a threshold. Everything dropped is counted by reason and molecule.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from so3lib.data.dataset import Dataset
from so3lib.data.readers import iter_spice_groups

MACE_OFF_ELEMENTS = (1, 6, 7, 8, 9, 15, 16, 17, 35, 53)  # H C N O F P S Cl Br I
_BRACKET = re.compile(r"\[([^\]]+)\]")
_CHARGE = re.compile(r"(\++|-+)(\d*)$")


def formal_charge(smiles: str) -> int:
    """Total formal charge of a (mapped or unmapped) SMILES: the sum over bracket atoms of their charge,
    e.g. ``[Na+]`` +1, ``[O-]`` −1, ``[Fe+3]`` +3, ``[O--]`` −2; atom-map classes (``:12``) are ignored."""
    total = 0
    for atom in _BRACKET.findall(smiles):
        atom = atom.split(":")[0]
        m = _CHARGE.search(atom)
        if m:
            sign = 1 if m.group(1)[0] == "+" else -1
            total += sign * (int(m.group(2)) if m.group(2) else len(m.group(1)))
    return total


def new_report(max_force_ev_per_a: float | None) -> dict:
    """Empty drop report: counts of molecules and conformers kept and dropped, by reason."""
    return {
        "molecules_in": 0,
        "conformers_in": 0,
        "molecules_kept": 0,
        "conformers_kept": 0,
        "dropped": {
            "element": {"molecules": 0, "conformers": 0, "names": []},
            "charged": {"molecules": 0, "conformers": 0, "names": []},
            "max_force": {"molecules": 0, "conformers": 0, "names": [], "threshold_ev_per_a": max_force_ev_per_a},
        },
    }


def filter_group(
    name: str, arrays: dict, report: dict, allowed: set[int], neutral_only: bool, max_force_ev_per_a: float | None
) -> np.ndarray | None:
    """Apply the MACE-OFF filters to one molecule group (arrays from `iter_spice_groups`): returns the boolean
    mask of conformers kept, or None when the whole molecule is dropped; counts go into ``report``."""
    n_conf = len(arrays["positions"])
    report["molecules_in"] += 1
    report["conformers_in"] += n_conf
    bad_z = sorted(set(np.unique(arrays["numbers"]).tolist()) - allowed)
    reason = "element" if bad_z else ("charged" if neutral_only and formal_charge(arrays["smiles"]) != 0 else None)
    if reason:
        d = report["dropped"][reason]
        d["molecules"] += 1
        d["conformers"] += n_conf
        d["names"].append(name)
        return None
    keep = np.ones(n_conf, bool)
    if max_force_ev_per_a is not None:
        keep = np.abs(arrays["forces"]).reshape(n_conf, -1).max(axis=1) <= max_force_ev_per_a
        if (~keep).any():
            d = report["dropped"]["max_force"]
            d["conformers"] += int((~keep).sum())
            d["names"].append(name)
            if not keep.any():
                d["molecules"] += 1
                return None
    report["molecules_kept"] += 1
    report["conformers_kept"] += int(keep.sum())
    return keep


def group_dataset(path: str | Path, name: str, arrays: dict, keep: np.ndarray) -> Dataset:
    """The kept conformers of one group as a validated `Dataset` (errors name the file, key and frame)."""
    k = int(keep.sum())
    return Dataset.from_arrays(
        source=str(path),
        numbers=arrays["numbers"],
        positions=arrays["positions"][keep],
        energy=arrays["energy"][keep],
        forces=arrays["forces"][keep],
        frame_index=np.nonzero(keep)[0],
        meta={
            "name": np.full(k, name, dtype=object),
            "smiles": np.full(k, arrays["smiles"], dtype=object),
            "subset": np.full(k, arrays["subset"], dtype=object),
        },
        keys={
            "numbers": f"{name}/atomic_numbers",
            "positions": f"{name}/conformations",
            "energy": f"{name}/dft_total_energy",
            "forces": f"{name}/dft_total_gradient",
        },
    )


def filter_spice(
    path: str | Path,
    elements: Sequence[int] = MACE_OFF_ELEMENTS,
    neutral_only: bool = True,
    max_force_ev_per_a: float | None = None,
    groups: Sequence[str] | None = None,
) -> tuple[Dataset | None, dict]:
    """Read a SPICE file group by group and apply the MACE-OFF filters, in memory (for files that fit; see
    `so3lib.data.store.convert_spice` for the streamed store). Returns (kept dataset or None when nothing
    survives, report) where the report counts kept and dropped molecules and conformers by reason."""
    allowed = set(int(z) for z in elements)
    report = new_report(max_force_ev_per_a)
    parts = []
    for name, a in iter_spice_groups(path, groups):
        keep = filter_group(name, a, report, allowed, neutral_only, max_force_ev_per_a)
        if keep is not None:
            parts.append(group_dataset(path, name, a, keep))
    return (Dataset.concatenate(parts) if parts else None), report
