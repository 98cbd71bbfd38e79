"""A trained potential as a `jax.export` artifact: serialized StableHLO that jax alone loads and calls, without
so3lib, flax or e3nn-jax (see ``docs/export.md``).

Two programs, with the parameters baked in as constants and symbolic sizes ``n_atoms`` and ``n_edges`` (one
artifact serves every system size; the caller compiles once per concrete shape):

    potential(positions [n_atoms, 3] Å, species [n_atoms] Z, cell [3, 3] Å, pbc [3] bool,
              senders [n_edges], receivers [n_edges], shifts [n_edges, 3] int)
        → energy [] eV (float64), forces [n_atoms, 3] eV/Å, stress [3, 3] eV/Å³ (ASE sign; NaN if not periodic)
    atomic_energies(positions, species, cell, senders, receivers, shifts) → e_i [n_atoms] eV (with its VJP)

E = Σ_i [scale · e_i(model) + shift + e_ref(Z_i)] + c (the per-element reference and its intercept included),
F = −∂E/∂r, σ = (1/V) ∂E/∂ε (symmetric strain ε at 0). An edge j → i has ``receivers = i``, ``senders = j`` and
r_ij = r_j − r_i + shifts · cell (rows of ``cell`` are lattice vectors), both directions listed (a full list, as
vesin's ``full_list=True`` or ``ase.neighborlist.neighbor_list('ijS', ...)`` with i → receivers, j → senders).
Padding: atoms with species 0 after the real ones, edges with a padding atom at either end after the real
edges; they contribute exactly zero. The residual energy is summed in the model dtype and the reference added
in float64, as `so3lib.calculator` does.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = "so3lib-jax-export"
FORMAT_VERSION = 1
META_FILE = "export.json"
PROGRAMS = {"potential": "potential.jax_export", "atomic_energies": "atomic_energies.jax_export"}

_EDGE = "edge j → i: receivers = i (centre), senders = j (neighbour), r_ij = r_j − r_i + shifts · cell"
_INPUTS = [  # name, shape, dtype ("model": the model's float dtype), units, meaning
    ("positions", ["n_atoms", 3], "model", "Å", "Cartesian positions; padding atoms after the real ones"),
    ("species", ["n_atoms"], "int32", "atomic number", "Z of each atom, 0 = padding atom"),
    ("cell", [3, 3], "model", "Å", "lattice vectors as rows (any values for a molecule)"),
    ("pbc", [3], "bool", "", "periodic along each lattice vector"),
    ("senders", ["n_edges"], "int32", "atom index", "j of each edge j → i (the neighbour)"),
    ("receivers", ["n_edges"], "int32", "atom index", "i of each edge j → i (the centre)"),
    (
        "shifts",
        ["n_edges", 3],
        "int32",
        "lattice vectors",
        "integer cell shift S of each edge: r_ij = r_j − r_i + S·cell",
    ),
]
_OUTPUTS = {
    "potential": [
        ("energy", [], "float64", "eV", "total energy, per-element reference included"),
        ("forces", ["n_atoms", 3], "model", "eV/Å", "−∂E/∂r (0 on padding atoms)"),
        ("stress", [3, 3], "model", "eV/Å³", "(1/V) ∂E/∂ε, ASE sign; NaN when no direction is periodic"),
    ],
    "atomic_energies": [
        ("atomic_energies", ["n_atoms"], "model", "eV", "scale·e_i + shift + e_ref(Z_i); 0 on padding atoms"),
    ],
}


def _hops(model) -> int | None:
    """Message-passing hops of a model's receptive field (a LAMMPS ghost shell must span hops × cutoff)."""
    if model.name == "schnet":
        return int(model.n_interactions)
    if model.name == "so3krates":
        return int(model.layers) + 1  # the initial Euclidean variables already sum over neighbours
    if model.name == "bpnn":
        return 1
    return None


def _programs(potential, params):
    """(potential_fn, atomic_energies_fn): pure jax functions of the documented inputs."""
    import jax
    import jax.numpy as jnp
    import jraph

    if hasattr(potential, "with_force_spread"):  # a shallow ensemble exports its mean: no per-head forces
        potential = potential.with_force_spread(False)
    table64 = np.asarray(potential.reference.table(), np.float64)
    intercept = float(potential.reference.intercept_ev)
    dt = potential.dtype

    def graph(positions, species, cell, pbc, senders, receivers, shifts):
        """One graph plus a padding graph holding one extra padding atom (jraph's convention needs one)."""
        n, e = positions.shape[0], senders.shape[0]
        real = species > 0
        n_real = jnp.sum(real, dtype=jnp.int32)
        e_real = jnp.sum(real[senders] & real[receivers], dtype=jnp.int32)
        return jraph.GraphsTuple(
            nodes={
                "positions": jnp.concatenate([positions, jnp.zeros((1, 3), positions.dtype)]),
                "species": jnp.concatenate([species, jnp.zeros(1, species.dtype)]),
            },
            edges={"shift": shifts.astype(dt)},
            senders=senders,
            receivers=receivers,
            n_node=jnp.stack([n_real, n + 1 - n_real]).astype(jnp.int32),
            n_edge=jnp.stack([e_real, e - e_real]).astype(jnp.int32),
            globals={"cell": jnp.stack([cell, jnp.zeros_like(cell)]), "pbc": jnp.stack([pbc, jnp.zeros_like(pbc)])},
        )

    def potential_fn(positions, species, cell, pbc, senders, receivers, shifts):
        g = graph(positions, species, cell, pbc, senders, receivers, shifts)
        out = potential(params, g, compute_stress=True)
        n_real = jnp.sum(species > 0)
        e_ref = jnp.sum(jnp.asarray(table64)[species]) + jnp.where(n_real > 0, intercept, 0.0)
        energy = out["energy_residual"][0].astype(jnp.float64) + e_ref
        periodic = jnp.any(pbc) & (jnp.abs(jnp.linalg.det(cell)) > 0)
        stress = jnp.where(periodic, out["stress"][0], jnp.nan)
        return energy, out["forces"][:-1], stress

    def atomic_energies_fn(positions, species, cell, senders, receivers, shifts):
        g = graph(positions, species, cell, jnp.zeros(3, bool), senders, receivers, shifts)
        e = potential.atomic_residual_energies(params, potential._cast(g))[:-1]  # a shallow ensemble: the heads' mean
        table = jnp.asarray(table64, dt)
        return jnp.where(species > 0, e + table[species], 0.0).astype(dt)

    return jax.jit(potential_fn), jax.jit(atomic_energies_fn)


def export_potential(potential, params, platforms: tuple[str, ...] = ("cpu", "cuda")) -> dict[str, bytes]:
    """{program name: serialized `jax.export.Exported`} for the given platforms (lowering for a platform needs
    no device of that kind). ``atomic_energies`` carries its first-order VJP (differentiable after loading)."""
    import jax
    from jax import export

    if potential.model.triplet_cutoff is not None:
        raise ValueError(
            f"model {potential.model.name} with angular symmetry functions needs triplets built on the host: "
            "it cannot be exported (schnet, so3krates and radial-only bpnn can)"
        )
    try:
        import flatbuffers  # noqa: F401  (jax.export's serializer)
    except ImportError:
        raise ValueError("so3lib export needs the flatbuffers package: pip install 'so3lib[export]'") from None
    platforms = tuple(dict.fromkeys(platforms))
    if not platforms:
        raise ValueError("no platform to export for (cpu, cuda, rocm)")
    with jax.enable_x64(True):  # the reference energy is added in float64; the model keeps its own dtype
        import jax.numpy as jnp

        dt = potential.dtype
        n, e = export.symbolic_shape("n_atoms, n_edges")
        s = jax.ShapeDtypeStruct
        pos, sp, cell, pbc = s((n, 3), dt), s((n,), jnp.int32), s((3, 3), dt), s((3,), jnp.bool_)
        snd, rcv, sh = s((e,), jnp.int32), s((e,), jnp.int32), s((e, 3), jnp.int32)
        host = jax.tree_util.tree_map(lambda a: np.asarray(a, dt), params)
        pot_fn, atom_fn = _programs(potential, host)
        pot_exp = export.export(pot_fn, platforms=platforms)(pos, sp, cell, pbc, snd, rcv, sh)
        atom_exp = export.export(atom_fn, platforms=platforms)(pos, sp, cell, snd, rcv, sh)
        return {"potential": bytes(pot_exp.serialize()), "atomic_energies": bytes(atom_exp.serialize(vjp_order=1))}


def metadata(potential, platforms, source: str | None = None) -> dict[str, Any]:
    """What ``export.json`` says: programs, inputs and outputs (shape, dtype, units), cutoff, species, model."""
    import jax
    import jaxlib
    from ase.data import chemical_symbols

    from so3lib._version import __version__

    dt = potential.model.dtype
    io = lambda rows: [  # noqa: E731
        {"name": n, "shape": sh, "dtype": dt if d == "model" else d, "units": u, "description": m}
        for n, sh, d, u, m in rows
    ]
    ref = potential.reference
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "so3lib_version": __version__,
        "jax_version": jax.__version__,
        "jaxlib_version": jaxlib.__version__,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "source_run": source,
        "platforms": list(platforms),
        "programs": {
            "potential": {"file": PROGRAMS["potential"], "inputs": io(_INPUTS), "outputs": io(_OUTPUTS["potential"])},
            "atomic_energies": {
                "file": PROGRAMS["atomic_energies"],
                "inputs": io([r for r in _INPUTS if r[0] != "pbc"]),
                "outputs": io(_OUTPUTS["atomic_energies"]),
                "vjp_order": 1,
                "note": "the intercept of an lstsq+intercept reference (per structure) is not in the atomic energies",
            },
        },
        "symbolic_dimensions": ["n_atoms", "n_edges"],
        "edge_convention": _EDGE + "; a full list (both directions of every pair)",
        "padding": "species 0 marks padding atoms (after the real ones); edges touching a padding atom are padding "
        "(after the real edges); both contribute exactly zero",
        "cutoff_angstrom": float(potential.cutoff),
        "species": [int(z) for z in ref.species],
        "elements": [chemical_symbols[int(z)] for z in ref.species],
        "energy_reference": {
            "method": ref.method,
            "energies_ev": {chemical_symbols[int(z)]: float(v) for z, v in zip(ref.species, ref.energies_ev)},
            "intercept_ev": float(ref.intercept_ev),
        },
        "scale_ev": float(potential.scale),
        "shift_ev_per_atom": float(potential.shift),
        "dtype": dt,
        "model": {"family": potential.model.name, "hyperparameters": potential.model.config_view()},
        "message_passing_hops": _hops(potential.model),
        "units": {"length": "Å", "energy": "eV", "forces": "eV/Å", "stress": "eV/Å³", "lammps_unit_style": "metal"},
    }


def is_export_folder(path: str | Path) -> bool:
    """True when ``path/export.json`` names this format (a folder `write_export` made)."""
    try:
        return json.loads((Path(path) / META_FILE).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def write_export(
    out: str | Path, potential, params, platforms: tuple[str, ...] = ("cpu", "cuda"), source: str | None = None
) -> dict[str, Any]:
    """Export into ``out``: a new or empty folder, or one `write_export` made (its files are replaced); any
    other existing path is refused. Returns the metadata written to ``export.json``."""
    from so3lib.training.run_folder import to_json, write_atomic

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out}: exists and is not a folder; choose another --out")
    if out.is_dir() and any(out.iterdir()) and not is_export_folder(out):
        raise FileExistsError(f"{out}: exists and was not written by so3lib export; choose another --out")
    blobs = export_potential(potential, params, platforms)
    meta = metadata(potential, tuple(dict.fromkeys(platforms)), source)
    out.mkdir(parents=True, exist_ok=True)
    for name, blob in blobs.items():
        write_atomic(out / PROGRAMS[name], blob)
        meta["programs"][name]["bytes"] = len(blob)
    write_atomic(out / META_FILE, to_json(meta))
    return meta


def load_export(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(metadata, {program name: `jax.export.Exported`}) of an export folder; needs only jax (the standalone
    loader in ``docs/export.md`` is the same in a few lines)."""
    from jax import export

    path = Path(path)
    if not is_export_folder(path):
        raise FileNotFoundError(f"{path}: not a so3lib export folder (no {META_FILE} of format {FORMAT})")
    meta = json.loads((path / META_FILE).read_text())
    programs = {k: export.deserialize(bytearray((path / v["file"]).read_bytes())) for k, v in meta["programs"].items()}
    return meta, programs
