"""Memory an MD system will ask for, estimated before anything is allocated, so a far too large supercell is
refused in one line instead of an allocation of terabytes.

Per step the engine holds, in the compute dtype (itemsize b): the neighbour list, N·K indices (K neighbours per
atom, with the list's capacity margin); the candidate search that rebuilds it: without a cell list jax-md's
all N² pair displacements (3·N²·b), with a cell list (periodic cells, n³ cells of side ≥ r_c + skin) the 27
neighbouring cells' candidates of every atom, N·27·C·(4·b + 12) bytes for cells of capacity C ≈ (m·ρ·V_cell +
3·sqrt(ρ·V_cell)) (m the capacity multiplier), plus the cell buffers n³·C·(3·b + 4); and the model's per-edge
intermediates, about N·K·(width·layers·4 + 16)·b. K comes from the number density: K ≈ ρ·(4/3)π(r_c + skin)³ for
a periodic cell; for a free system K is counted on a sample of atoms. With a cell list everything is linear in N.
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
    cells_per_side: int | None = None,
) -> float:
    """Estimated peak bytes of an MD run (see the module docstring). ``cells_per_side``: the cell list's n
    (default: the largest n with cells of side ≥ ``radius_a`` in a cube of ``volume_a3``)."""
    k = neighbours_per_atom(n_atoms, volume_a3, radius_a, positions) * capacity_multiplier
    if cell_list:
        if volume_a3 is None or volume_a3 <= 0:
            raise ValueError("a cell list needs a periodic cell with a volume")
        n = cells_per_side or max(int(volume_a3 ** (1 / 3) // radius_a), 1)
        occupancy = n_atoms / n**3
        cap = capacity_multiplier * occupancy + 3.0 * np.sqrt(occupancy) + 1.0
        pairs = float(n_atoms) * 27 * cap * (4 * itemsize + 12) + n**3 * cap * (3 * itemsize + 4)
    else:
        pairs = 3.0 * float(n_atoms) ** 2 * itemsize
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
    n_atoms: int,
    volume_a3,
    radius_a,
    cell_list,
    itemsize,
    width,
    layers,
    where: str,
    positions=None,
    capacity_multiplier: float = 1.25,
    cells_per_side: int | None = None,
) -> float:
    """The estimate; `MemoryError` in one line when it exceeds 80 % of the available memory."""
    need = md_memory_bytes(
        n_atoms,
        volume_a3,
        radius_a,
        cell_list,
        itemsize,
        width,
        layers,
        capacity_multiplier,
        positions=positions,
        cells_per_side=cells_per_side,
    )
    have = available_bytes()
    if need > 0.8 * have:
        raise MemoryError(
            f"{where}: {n_atoms} atoms need about {_size(need)} for MD (neighbour list"
            f"{', cell list' if cell_list else ', all N² pair displacements'} and the model's per-edge work), "
            f"more than the {_size(have)} available: use a smaller --supercell"
        )
    return need


def _size(b: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB", "PB"):
        if b < 1000 or unit == "PB":
            return f"{b:.3g} {unit}"
        b /= 1000
    return f"{b:.3g} PB"
