"""SPICE preprocessing as MACE-OFF23 did it: keep the elements H C N O F P S Cl Br I, neutral molecules only
(total charge from the formal charges in the SMILES), and drop conformers whose largest force component
exceeds a threshold. Everything dropped is counted by reason and molecule.

A NaN or infinite ``dft_total_energy`` or ``dft_total_gradient`` is no force-threshold drop: by default
(``nonfinite="error"``) it is a `DataError` naming the file, '<group>/<key>' and the conformer; with
``nonfinite="drop"`` the conformer is dropped and counted under its own reason, ``dropped["nonfinite"]``, and a
warning (logger ``so3lib.data``) names the file and the count.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np

from so3lib.data.dataset import NONFINITE, Dataset, finite_labels
from so3lib.data.errors import DataError
from so3lib.data.readers import iter_spice_groups

log = logging.getLogger("so3lib.data")

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
    """Empty drop report: counts of molecules and conformers kept and dropped, by reason. The reasons, in the order
    they are applied: ``no_conformations`` (a group without any conformation), ``element`` (an element outside
    the allowed set) and ``charged`` (non-zero total formal
    charge) drop whole molecules; ``nonfinite`` (a NaN or infinite energy or gradient, only with
    ``nonfinite="drop"``; ``frames`` maps each molecule to the indices of its dropped conformers) and
    ``max_force`` (the largest force component of a finite conformer above the threshold) drop conformers. A
    molecule counts under ``molecules`` of the reason that dropped its last conformers; ``names`` lists every
    molecule that lost conformers for that reason."""
    return {
        "molecules_in": 0,
        "conformers_in": 0,
        "molecules_kept": 0,
        "conformers_kept": 0,
        "dropped": {
            "no_conformations": {"molecules": 0, "conformers": 0, "names": []},
            "element": {"molecules": 0, "conformers": 0, "names": []},
            "charged": {"molecules": 0, "conformers": 0, "names": []},
            "nonfinite": {"molecules": 0, "conformers": 0, "names": [], "frames": {}},
            "max_force": {"molecules": 0, "conformers": 0, "names": [], "threshold_ev_per_a": max_force_ev_per_a},
        },
    }


def filter_group(
    name: str,
    arrays: dict,
    report: dict,
    allowed: set[int],
    neutral_only: bool,
    max_force_ev_per_a: float | None,
    nonfinite: Literal["error", "drop"] = "error",
) -> np.ndarray | None:
    """Apply the MACE-OFF filters to one molecule group (arrays from `iter_spice_groups`): returns the boolean
    mask of conformers kept, or None when the whole molecule is dropped; counts go into ``report``.

    Conformers with a NaN or infinite energy or force are never force-threshold drops: with ``nonfinite="drop"``
    they are dropped under ``report["dropped"]["nonfinite"]``; with "error" they are kept, so that `group_dataset`
    raises the `DataError` naming the file, key and conformer."""
    if nonfinite not in NONFINITE:
        raise ValueError(f"nonfinite must be one of {NONFINITE}, got {nonfinite!r}")
    n_conf = len(arrays["positions"])
    report["molecules_in"] += 1
    report["conformers_in"] += n_conf
    if n_conf == 0:
        d = report["dropped"]["no_conformations"]
        d["molecules"] += 1
        d["names"].append(name)
        return None
    bad_z = sorted(set(np.unique(arrays["numbers"]).tolist()) - allowed)
    reason = "element" if bad_z else ("charged" if neutral_only and formal_charge(arrays["smiles"]) != 0 else None)
    if reason:
        d = report["dropped"][reason]
        d["molecules"] += 1
        d["conformers"] += n_conf
        d["names"].append(name)
        return None
    forces = np.asarray(arrays["forces"]).reshape(n_conf, -1)
    fin = finite_labels(np.arange(n_conf + 1), arrays["energy"], forces)
    finite = fin["energy"] & fin["forces"]
    keep = np.ones(n_conf, bool)
    if nonfinite == "drop" and not finite.all():
        d = report["dropped"]["nonfinite"]
        d["conformers"] += int((~finite).sum())
        d["names"].append(name)
        d["frames"][name] = np.nonzero(~finite)[0].tolist()
        keep = finite.copy()
        if not keep.any():
            d["molecules"] += 1
            return None
    if max_force_ev_per_a is not None:
        fmax = np.abs(np.where(finite[:, None], forces, 0.0)).max(axis=1) if forces.size else np.zeros(n_conf)
        over = finite & (fmax > max_force_ev_per_a)
        if over.any():
            keep &= ~over
            d = report["dropped"]["max_force"]
            d["conformers"] += int(over.sum())
            d["names"].append(name)
            if not keep.any():
                d["molecules"] += 1
                return None
    report["molecules_kept"] += 1
    report["conformers_kept"] += int(keep.sum())
    return keep


def warn_nonfinite(source: str | Path, report: dict) -> None:
    """The one warning for conformers dropped with ``nonfinite="drop"`` (nothing when none were)."""
    d = report["dropped"]["nonfinite"]
    if not d["conformers"]:
        return
    shown = "; ".join(f"{k}: {v[:5]}{' ...' if len(v) > 5 else ''}" for k, v in list(d["frames"].items())[:5])
    more = f"; ... ({len(d['frames']) - 5} more molecules)" if len(d["frames"]) > 5 else ""
    log.warning(
        "%s: dropped %d conformer(s) of %d molecule(s) with a NaN or infinite dft_total_energy or "
        "dft_total_gradient (nonfinite='drop'), by molecule: %s%s",
        source,
        d["conformers"],
        len(d["names"]),
        shown,
        more,
    )


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
    nonfinite: Literal["error", "drop"] = "error",
) -> tuple[Dataset | None, dict]:
    """Read a SPICE file group by group and apply the MACE-OFF filters, in memory (for files that fit; see
    `so3lib.data.store.convert_spice` for the streamed store). Returns (kept dataset or None when nothing
    survives, report) where the report counts kept and dropped molecules and conformers by reason (`new_report`).
    ``nonfinite``: a NaN or infinite label is a `DataError` ("error") or a drop counted in the report ("drop")."""
    if nonfinite not in NONFINITE:
        raise DataError(path, f"nonfinite must be one of {NONFINITE}, got {nonfinite!r}")
    allowed = set(int(z) for z in elements)
    report = new_report(max_force_ev_per_a)
    parts = []
    for name, a in iter_spice_groups(path, groups):
        keep = filter_group(name, a, report, allowed, neutral_only, max_force_ev_per_a, nonfinite)
        if keep is not None:
            parts.append(group_dataset(path, name, a, keep))
    warn_nonfinite(path, report)
    return (Dataset.concatenate(parts) if parts else None), report
