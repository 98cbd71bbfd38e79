"""Memory an MD system will ask for, estimated before anything is allocated, so a far too large supercell is
refused in one line instead of an allocation of terabytes.

Per step the engine holds, in the compute dtype (itemsize b): the neighbour list, N·K indices (K neighbours per
atom, with the list's capacity margin); without a cell list, jax-md's allocation of all N² pair displacements
(3·N²·b); and the model's per-edge intermediates, about N·K·(width·layers·4 + 16)·b. K comes from the number
density: K ≈ ρ·(4/3)π(r_c + skin)³ for a periodic cell; for a free system K is counted on a sample of atoms.
"""

from __future__ import annotations

import os

import numpy as np


def neighbours_per_atom(n_atoms: int, volume_a3: float | None, radius_a: float, positions=None) -> float:
    """Expected neighbours within ``radius_a`` (Å) of an atom: for a periodic cell the number density times the
    sphere volume; for a free system the mean count over up to 1000 sampled atoms (a k-d tree of the positions),
    at most N − 1."""
    if volume_a3 is not None and volume_a3 > 0:
        return float(min(n_atoms / volume_a3 * 4.0 / 3.0 * np.pi * radius_a**3, max(n_atoms - 1, 1)))
    if positions is None:
        return float(max(n_atoms - 1, 1))
    from scipy.spatial import cKDTree

    pos = np.asarray(positions, float)
    sample = pos[np.random.default_rng(0).choice(len(pos), size=min(1000, len(pos)), replace=False)]
    counts = cKDTree(pos).query_ball_point(sample, radius_a, return_length=True)
    return float(max(np.mean(counts) - 1.0, 1.0))


def md_memory_bytes(
    n_atoms: int,
    volume_a3: float | None,
    radius_a: float,
    cell_list: bool,
    itemsize: int,
    width: int,
    layers: int,
    capacity_multiplier: float = 1.25,
    positions=None,
) -> float:
    """Estimated peak bytes of an MD run (see the module docstring)."""
    k = neighbours_per_atom(n_atoms, volume_a3, radius_a, positions) * capacity_multiplier
    pairs = 0.0 if cell_list else 3.0 * float(n_atoms) ** 2 * itemsize
    edges = float(n_atoms) * k * (4 + (width * layers * 4 + 16) * itemsize)
    return pairs + edges


def available_bytes() -> float:
    """Memory of the first JAX device (its allocator's limit on a GPU), else the host's physical memory."""
    import jax

    dev = jax.devices()[0]
    stats = dev.memory_stats() if hasattr(dev, "memory_stats") else None
    if stats and stats.get("bytes_limit"):
        return float(stats["bytes_limit"])
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def check_md_memory(
    n_atoms: int, volume_a3, radius_a, cell_list, itemsize, width, layers, where: str, positions=None
) -> float:
    """The estimate; `MemoryError` in one line when it exceeds 80 % of the available memory."""
    need = md_memory_bytes(n_atoms, volume_a3, radius_a, cell_list, itemsize, width, layers, positions=positions)
    have = available_bytes()
    if need > 0.8 * have:
        raise MemoryError(
            f"{where}: {n_atoms} atoms need about {_size(need)} for MD (neighbour list"
            f"{'' if cell_list else ', all N² pair displacements'} and the model's per-edge work), more than the "
            f"{_size(have)} available: use a smaller --supercell"
        )
    return need


def _size(b: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB", "PB"):
        if b < 1000 or unit == "PB":
            return f"{b:.3g} {unit}"
        b /= 1000
    return f"{b:.3g} PB"
