"""Molecular dynamics on the device with jax-md, driven by a trained so3lib potential.

Units: Å, eV, amu; time in fs at the interface (the internal unit is Å·sqrt(amu/eV) = 10.1805 fs), temperature
in K (kT in eV inside), pressure in bar (eV/Å³ inside). The neighbour list is jax-md's (Dense format, cutoff + skin,
rebuilt when an atom moved more than skin/2). A periodic cell is simulated in fractional coordinates u ∈ [0, 1)³
(x = u·cell, the cell turned to the lower-triangular standard form jax-md needs): that lets jax-md bin the atoms
into a cell list, O(N) instead of the all-pairs O(N²) search, once the cell holds at least 4 list cutoffs per side
(automatic above `CELL_LIST_MIN_ATOMS` atoms, or `MDConfig.cell_list`). Each chunk of ``save_every`` steps
runs inside one compiled `lax.scan`. After every chunk the host checks, in this order: neighbour-list overflow
(the list is reallocated with more capacity and the chunk is re-run from its start: nothing is dropped), an NPT
cell shrunk below twice the cutoff, non-finite values and a runaway temperature (`MDBlowUp`, naming the step).

Ensembles: NVE velocity Verlet, NVT Langevin and Nosé–Hoover chains (jax-md), a Berendsen thermostat
(velocity rescaling before each velocity-Verlet step, as ASE's NVTBerendsen) whose target can ramp linearly from
T0 to T1, and NPT (jax-md's isotropic Martyna–Tuckerman–Klein barostat with Nosé–Hoover chains,
`simulate.npt_nose_hoover`, on the model's virial −∂E/∂ε, periodic cells only). Temperatures, degrees of freedom
(3N − 3: the centre-of-mass momentum is removed and conserved, the Langevin noise projected off it, the
Nosé–Hoover chains told n_dof) and the Maxwell–Boltzmann start are `so3lib.md.thermo`'s, shared with the ASE
engine. Langevin (BAOAB) records the momenta right after its noise step, where they are canonical (at the end of
the step they run (ωΔt)²/4 cold per mode). The blow-up guards are `so3lib.md.guards`'.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Literal

import jax
import jax.numpy as jnp
import jraph
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from so3lib.md import guards, thermo
from so3lib.md.thermo import KB_EV_PER_K
from so3lib.potential import Potential

log = logging.getLogger(__name__)
FS_PER_TIME_UNIT = 10.180505710774743  # Å·sqrt(amu/eV) in fs
EV_PER_A3_PER_BAR = 6.241509125883258e-07  # 1 bar = 1e5 Pa in eV/Å³
CELL_LIST_MIN_ATOMS = 2000  # automatic cell list from this size on (below it the all-pairs search is faster)
Ensemble = Literal["nve", "nvt-langevin", "nvt-nose-hoover", "berendsen", "npt"]


class MDBlowUp(RuntimeError):
    """The simulation produced NaN/inf or a runaway temperature."""


class MDConfig(BaseModel):
    """One MD run. ``ramp_k`` = (T0, T1) makes the thermostat target go linearly from T0 to T1 over the run."""

    model_config = ConfigDict(extra="forbid")
    ensemble: Ensemble = "nve"
    temperature_k: float = Field(300.0, ge=0)
    ramp_k: tuple[float, float] | None = None
    steps: int = Field(1000, ge=1)
    dt_fs: float = Field(0.5, description="time step (fs)")
    save_every: int = Field(10, ge=1, description="record energies and a frame every this many steps")
    friction_per_ps: float = Field(10.0, gt=0, description="Langevin friction γ (1/ps)")
    tau_fs: float = Field(100.0, gt=0, description="Berendsen / Nosé–Hoover time constant (fs)")
    pressure_bar: float | None = Field(None, description="NPT target pressure (bar)")
    barostat_tau_fs: float = Field(500.0, gt=0, description="NPT barostat time constant (fs)")
    cell_list: bool | None = Field(
        None, description=f"periodic cells: jax-md cell list (None: when ≥ {CELL_LIST_MIN_ATOMS} atoms and it fits)"
    )
    skin_angstrom: float = Field(1.0, ge=0)
    capacity_multiplier: float = Field(1.25, ge=1.0)
    max_temperature_k: float = Field(10000.0, gt=0, description="stop the run above this temperature")
    max_step_angstrom: float = Field(0.5, gt=0, description="stop if an atom moves more than this in one step (Å)")
    max_energy_error_ev_per_atom: float = Field(
        0.1, gt=0, description="NVE: stop if the total energy leaves its start by more than this (eV/atom)"
    )
    seed: int = 0

    @model_validator(mode="after")
    def _check(self):
        if not self.dt_fs > 0:
            raise ValueError(f"the time step must be positive, got dt_fs={self.dt_fs}")
        if self.ramp_k is not None and self.ensemble == "nve":
            raise ValueError("a temperature ramp needs a thermostat (berendsen, nvt-langevin or nvt-nose-hoover)")
        if self.ensemble == "npt" and self.pressure_bar is None:
            raise ValueError("the npt ensemble needs a target pressure (--pressure BAR)")
        if self.ensemble != "npt" and self.pressure_bar is not None:
            raise ValueError(f"a target pressure ({self.pressure_bar} bar) needs --ensemble npt, not {self.ensemble}")
        return self

    def target_k(self, step: np.ndarray) -> np.ndarray:
        if self.ramp_k is None:
            return np.full(np.shape(step), self.temperature_k, float)
        t0, t1 = self.ramp_k
        return t0 + (t1 - t0) * np.asarray(step, float) / self.steps


RECORD_KEYS = (
    "step",
    "potential_ev",
    "kinetic_ev",
    "temperature_k",
    "positions",
    "forces",
    "velocities",
    "cells",
    "pressure_bar",
    "stress",
)


def new_records() -> dict[str, list]:
    """Empty per-frame lists, one per `RECORD_KEYS` entry, for `MDResult.from_records`."""
    return {k: [] for k in RECORD_KEYS}


def add_record(rec: dict[str, list], **frame) -> None:
    """Append one saved frame to ``rec``: every `RECORD_KEYS` entry, None for what the engine does not record."""
    if set(frame) != set(RECORD_KEYS):
        raise TypeError(f"an MD record needs exactly {RECORD_KEYS}, got {sorted(frame)}")
    for key, value in frame.items():
        rec[key].append(value)


@dataclasses.dataclass
class MDResult:
    """Per record (every ``save_every`` steps, including step 0): step, time_fs, potential/kinetic/total
    energy (eV, potential including the per-element reference), temperature (K) = 2·E_kin / (n_dof·k_B),
    positions (R, N, 3) Å; where the engine records them: forces (R, N, 3) eV/Å, velocities (R, N, 3) in ASE's
    unit Å/(Å·sqrt(amu/eV)), stress (R, 3, 3) eV/Å³ (periodic runs, potential part, ASE's sign); for a periodic
    cell also the cells (R, 3, 3) Å (rows are lattice vectors; they change under NPT) and the instantaneous
    pressure P = (2·E_kin − ∂E/∂ε) / (3V) (bar, the virial route)."""

    step: np.ndarray
    time_fs: np.ndarray
    potential_ev: np.ndarray
    kinetic_ev: np.ndarray
    temperature_k: np.ndarray
    positions: np.ndarray
    n_atoms: int
    wall_s: float
    compile_s: float
    reallocations: int
    stopped: str | None = None
    cells: np.ndarray | None = None  # (R, 3, 3) Å
    pressure_bar: np.ndarray | None = None  # (R,)
    forces: np.ndarray | None = None
    velocities: np.ndarray | None = None
    stress: np.ndarray | None = None
    n_dof: int | None = None

    @classmethod
    def from_records(
        cls,
        rec: dict[str, list],
        dt_fs: float,
        n_atoms: int,
        *,
        wall_s: float,
        compile_s: float = 0.0,
        reallocations: int = 0,
        stopped: str | None = None,
        n_dof: int | None = None,
    ) -> MDResult:
        """The result of an engine's per-frame lists ``rec`` (keys: the field names `RECORD_KEYS`; one entry per
        saved frame). A quantity the engine did not record (key absent, list empty, or an entry None, e.g. the
        stress of a molecule) is None; every list is cut to the recorded steps (nothing after a blow-up)."""
        m = len(rec["step"])

        def stacked(key: str, as_array=np.stack):
            values = rec.get(key) or []
            if len(values) < m or any(v is None for v in values[:m]):
                return None
            return as_array([np.asarray(v, float) for v in values[:m]])

        steps = np.asarray(rec["step"][:m], int)
        return cls(
            step=steps,
            time_fs=steps * dt_fs,
            potential_ev=np.asarray(rec["potential_ev"][:m], float),
            kinetic_ev=np.asarray(rec["kinetic_ev"][:m], float),
            temperature_k=np.asarray(rec["temperature_k"][:m], float),
            positions=np.stack(rec["positions"][:m]),
            n_atoms=n_atoms,
            wall_s=wall_s,
            compile_s=compile_s,
            reallocations=reallocations,
            stopped=stopped,
            cells=stacked("cells"),
            pressure_bar=stacked("pressure_bar", np.asarray),
            forces=stacked("forces"),
            velocities=stacked("velocities"),
            stress=stacked("stress"),
            n_dof=n_dof,
        )

    @property
    def volume_a3(self) -> np.ndarray | None:
        return None if self.cells is None else np.abs(np.linalg.det(self.cells))

    @property
    def total_ev(self) -> np.ndarray:
        return self.potential_ev + self.kinetic_ev

    @property
    def steps_per_s(self) -> float:
        return float(self.step[-1]) / max(self.wall_s, 1e-9)


def _graph(
    pot: Potential,
    species: jnp.ndarray,
    box: jnp.ndarray,
    periodic: bool,
    R: jnp.ndarray,
    idx: jnp.ndarray,
    perturbation=None,
    triplet_fraction: float = 1.0,
) -> jraph.GraphsTuple:
    """Padded graph of one structure from a jax-md Dense neighbour list ``idx`` (N, K) (padding value N):
    edges j → i for idx[i, k] = j, real edges first (jraph convention).

    Periodic: ``R`` (N, 3) are fractional coordinates u and ``box`` the jax-md (column) box T, so x = T·u
    (`space.transform`, whose derivative passes Cartesian gradients through to u, so −∂E/∂u is the Cartesian
    force) and the edge j → i is x_j − x_i + s·cellᵀ with the minimum-image shift s = −round(u_j − u_i).
    ``perturbation`` (a scalar 1 + ε) scales positions and cell, so ∂E/∂ε is the isotropic virial jax-md's
    pressure and barostat ask for. Free: ``R`` are Cartesian positions and ``box`` the (unused) cell.
    Angular models get the exact triplets inside their angular cutoff, ``triplet_fraction`` of the slot pairs
    (`so3lib.md.triplets`)."""
    from jax_md import space

    N, K = idx.shape
    dt = pot.dtype
    recv = jnp.repeat(jnp.arange(N), K)
    send = idx.reshape(-1)
    valid = send < N
    order = jnp.argsort(~valid, stable=True)
    recv, send, valid = jnp.where(valid[order], recv[order], N), send[order], valid[order]
    n_real = jnp.sum(valid)
    if periodic:
        u = jnp.concatenate([R.astype(dt), jnp.zeros((1, 3), dt)])
        d = jax.lax.stop_gradient(u[send] - u[recv])
        shift = jnp.where(valid[:, None], -jnp.round(d), 0.0)
        Rp = space.transform(box.astype(dt), u)
        cell = box.T.astype(dt)
        if perturbation is not None:
            Rp, cell = Rp * perturbation, cell * perturbation
    else:
        Rp = jnp.concatenate([R.astype(dt), jnp.zeros((1, 3), dt)])
        shift = jnp.zeros((N * K, 3), dt)
        cell = box.astype(dt)
    cells = jnp.stack([cell, jnp.zeros((3, 3), dt)])
    glob = {
        "cell": cells,
        "pbc": jnp.array([[periodic] * 3, [False] * 3]),
        "energy": jnp.zeros(2, dt),
        "energy_residual": jnp.zeros(2, dt),
        "stress": jnp.zeros((2, 3, 3), dt),
        "has_energy": jnp.zeros(2, dt),
        "has_forces": jnp.zeros(2, dt),
        "has_stress": jnp.zeros(2, dt),
    }
    if pot.model.triplet_cutoff is not None:  # exact triplets inside the angular cutoff, fixed capacity
        from so3lib.md import triplets

        cap = triplets.capacity(N, K, triplet_fraction)
        x = jax.lax.stop_gradient(Rp[:N])  # Cartesian, jax-md's frame: only which pairs, not their values
        e1, e2, tmask, _ = triplets.exact_triplets(x, idx, cell, periodic, pot.model.triplet_cutoff, cap)
        inv = jnp.argsort(order)  # slot → edge index in the sorted edge list
        glob["triplets"] = jnp.stack([inv[e1], inv[e2]], axis=1).astype(jnp.int32)
        glob["triplet_mask"] = tmask
    return jraph.GraphsTuple(
        nodes={
            "positions": Rp,
            "species": jnp.concatenate([species, jnp.zeros(1, species.dtype)]),
            "forces": jnp.zeros((N + 1, 3), dt),
        },
        edges={"shift": shift.astype(dt)},
        senders=send.astype(jnp.int32),
        receivers=recv.astype(jnp.int32),
        n_node=jnp.array([N, 1], jnp.int32),
        n_edge=jnp.stack([n_real, N * K - n_real]).astype(jnp.int32),
        globals=glob,
    )


def energy_function(
    pot: Potential, params, numbers: np.ndarray, box: np.ndarray, periodic: bool, triplet_fraction: float = 1.0
):
    """``energy(R, neighbor, box=box, perturbation=None) -> E_residual`` (eV, without the constant per-element
    reference) for jax-md; periodic: ``R`` fractional and ``box`` the jax-md box (columns = lattice vectors),
    free: ``R`` Cartesian (``box`` unused)."""
    species = jnp.asarray(numbers, jnp.int32)
    box0 = jnp.asarray(box, pot.dtype)

    def energy(R, neighbor, box=None, perturbation=None, **unused):
        b = box0 if box is None else box
        g = _graph(pot, species, b, periodic, R, neighbor.idx, perturbation, triplet_fraction)
        return pot.residual_energy(params, g)[0]

    return energy


def standard_cell(cell: np.ndarray) -> np.ndarray:
    """(3, 3) the cell (rows a, b, c) turned rigidly to the lower-triangular form (a along x, b in the xy plane)
    whose transpose is the upper-triangular box jax-md's cell list needs; fractional coordinates are unchanged."""
    from ase.cell import Cell

    if np.linalg.det(cell) <= 0:
        raise ValueError(
            f"the cell {np.round(cell, 4).tolist()} is left-handed (det < 0): reorder its lattice vectors, or use "
            "--engine ase"
        )
    return np.asarray(Cell(cell).standard_form()[0])


def cell_heights(cell: np.ndarray) -> np.ndarray:
    """(3,) distances between opposite faces of the cell (Å): V / |b × c|, V / |c × a|, V / |a × b|."""
    return abs(np.linalg.det(cell)) / np.linalg.norm(np.cross(cell[[1, 2, 0]], cell[[2, 0, 1]]), axis=1)


def cells_per_side(cell: np.ndarray, list_cutoff: float) -> int:
    """Cells per side of jax-md's fractional cell list, floor(min height / list cutoff); it builds one at ≥ 4."""
    return int(np.floor(np.min(cell_heights(cell)) / list_cutoff))


def _triplet_capacity(pot: Potential, neighbor_fn, R0, box, periodic: bool, multiplier: float):
    """(fraction of the slot pairs kept as triplet capacity, ``f(R, nbrs, box) -> nbrs`` that marks a triplet
    overflow as a neighbour-list overflow: the engine then reallocates a larger list, whose capacity grows
    with it, and re-runs the chunk). Periodic: ``R`` fractional and ``box`` jax-md's (column) box."""
    tc = pot.model.triplet_cutoff
    if tc is None:
        return 1.0, lambda R, nbrs, b: nbrs
    from jax_md import partition, space

    from so3lib.md import triplets

    def cartesian(R, b):  # positions (Å) and cell rows in jax-md's frame
        return (space.transform(b, R), b.T) if periodic else (R, b)

    idx = neighbor_fn.allocate(R0).idx
    x0, c0 = cartesian(jnp.asarray(R0), jnp.asarray(box))
    n0 = int(triplets.count_triplets(x0, idx, c0, periodic, tc))
    fraction = triplets.fraction_for(n0, idx.shape[0], idx.shape[1], multiplier)
    log.info("MD: %d angular triplets at step 0; capacity %.3g of the neighbour slot pairs", n0, fraction)

    def overflow(R, nbrs, b):
        N, K = nbrs.idx.shape
        x, c = cartesian(R, b)
        over = triplets.count_triplets(x, nbrs.idx, c, periodic, tc) > triplets.capacity(N, K, fraction)
        return nbrs.set(error=nbrs.error.update(partition.PartitionErrorCode.NEIGHBOR_LIST_OVERFLOW, over))

    return fraction, overflow


def run_md(
    pot: Potential,
    params,
    atoms,
    cfg: MDConfig,
    progress: bool = True,
    raise_on_blowup: bool = True,
    capacity_from: np.ndarray | None = None,
    monitor=None,
) -> MDResult:
    """Run MD of ``atoms`` (ase.Atoms; positions Å, masses amu; periodic if all pbc) with ``cfg``. A blow-up
    raises `MDBlowUp` naming the step, or with ``raise_on_blowup=False`` returns the records up to it with
    ``stopped`` set. ``capacity_from``: positions to size the first neighbour list with (tests the overflow
    path with a list allocated too small). ``monitor(step, positions) -> bool`` is called on every saved frame
    (step 0 included); True stops the run after that frame (see `so3lib.md.uncertainty`)."""
    try:
        from jax_md import partition, quantity, simulate, space
    except ImportError as exc:
        raise ImportError(
            "on-device MD needs jax-md, an optional dependency: pip install 'so3lib[md]' (or run with --engine ase)"
        ) from exc
    from tqdm.auto import tqdm

    from so3lib.md.memory import check_md_memory

    numbers = np.asarray(atoms.numbers)
    if len(numbers) < 2:
        raise ValueError(
            f"MD needs at least 2 atoms, the structure has {len(numbers)} (a single atom does not move once its "
            "centre-of-mass velocity is removed)"
        )
    pot.reference.check_species(numbers, f"structure {atoms.get_chemical_formula()}")
    periodic = bool(np.all(atoms.pbc))
    if np.any(atoms.pbc) and not periodic:
        raise ValueError(
            f"mixed boundary conditions pbc={atoms.pbc.tolist()} are not supported by the on-device "
            "engine (use --engine ase)"
        )
    if cfg.ensemble == "npt" and not periodic:
        raise ValueError(
            f"NPT (--pressure {cfg.pressure_bar} bar) needs a cell periodic in all three directions; "
            f"structure {atoms.get_chemical_formula()} has pbc={np.asarray(atoms.pbc).tolist()}"
        )
    dtype = pot.dtype
    N = len(atoms)
    cell = np.asarray(atoms.cell.array, float)
    rc = pot.cutoff + cfg.skin_angstrom  # the list holds pairs within cutoff + skin
    cell_list = False
    if periodic:
        heights = cell_heights(cell)
        if np.any(heights < 2 * rc):
            raise ValueError(
                f"cell heights {np.round(heights, 2).tolist()} Å are below twice the cutoff + skin "
                f"({2 * rc:.2f} Å): minimum image fails; use a larger --supercell"
            )
        std = standard_cell(cell)
        rotation = np.linalg.solve(std, cell)  # std @ rotation = cell: jax-md's frame → the structure's
        box = jnp.asarray(std.T, dtype)
        displacement, shift = space.periodic_general(box, fractional_coordinates=True)
        R0 = jnp.asarray(atoms.cell.scaled_positions(atoms.positions) % 1.0, dtype)
        fits = cells_per_side(cell, rc) >= 4
        if cfg.cell_list and not fits:
            raise ValueError(
                f"a cell list needs cell heights of at least 4 × (cutoff + skin) = {4 * rc:.2f} Å, the cell has "
                f"{np.round(heights, 2).tolist()} Å: use a larger --supercell, or no cell list"
            )
        cell_list = fits if cfg.cell_list is None and N >= CELL_LIST_MIN_ATOMS else bool(cfg.cell_list and fits)
    else:
        if cfg.cell_list:
            raise ValueError("a cell list needs a periodic cell (the free-space search is all pairs)")
        displacement, shift = space.free()
        box = jnp.asarray(cell, dtype)
        rotation = None
        R0 = jnp.asarray(atoms.positions, dtype)
    model = pot.model
    check_md_memory(
        N,
        abs(float(np.linalg.det(cell))) if periodic else None,
        rc,
        cell_list,
        np.dtype(dtype).itemsize,
        int(getattr(model, "n_atom_basis", getattr(model, "features", 64))),
        int(getattr(model, "n_interactions", getattr(model, "layers", 3))),
        f"structure {atoms.get_chemical_formula(mode='hill', empirical=False)[:40]}",
        positions=None if periodic else atoms.positions,
        capacity_multiplier=cfg.capacity_multiplier,
        cells_per_side=cells_per_side(cell, rc) if cell_list else None,
    )
    neighbor_fn = partition.neighbor_list(
        displacement,
        box,
        pot.cutoff,
        dr_threshold=cfg.skin_angstrom,
        capacity_multiplier=cfg.capacity_multiplier,
        disable_cell_list=not cell_list,
        fractional_coordinates=periodic,
        format=partition.Dense,
    )
    tri_fraction, tri_overflow = _triplet_capacity(pot, neighbor_fn, R0, box, periodic, cfg.capacity_multiplier)
    energy = energy_function(pot, params, numbers, box, periodic, tri_fraction)
    mass = jnp.asarray(atoms.get_masses(), dtype)
    dt = cfg.dt_fs / FS_PER_TIME_UNIT
    kT0 = float(cfg.target_k(np.array(0.0))) * KB_EV_PER_K
    tau = cfg.tau_fs / FS_PER_TIME_UNIT
    if cfg.ensemble == "nvt-langevin":
        init_fn, apply_fn = simulate.nvt_langevin(
            energy, shift, dt, kT0, gamma=cfg.friction_per_ps * 1e-3 * FS_PER_TIME_UNIT
        )
    elif cfg.ensemble == "nvt-nose-hoover":
        init_fn, apply_fn = simulate.nvt_nose_hoover(energy, shift, dt, kT0, tau=tau)
    elif cfg.ensemble == "npt":
        init_fn, apply_fn = simulate.npt_nose_hoover(
            energy,
            shift,
            dt,
            cfg.pressure_bar * EV_PER_A3_PER_BAR,
            kT0,
            barostat_kwargs={"tau": cfg.barostat_tau_fs / FS_PER_TIME_UNIT},
            thermostat_kwargs={"tau": tau},
        )
    else:
        init_fn, apply_fn = simulate.nve(energy, shift, dt)
    berendsen = cfg.ensemble == "berendsen"
    npt = cfg.ensemble == "npt"

    def box_of(state):
        """The jax-md box of ``state`` (it changes only under NPT)."""
        return simulate.npt_box(state) if npt else box

    def pressure(state, nbrs, start: bool = False):
        """Instantaneous pressure (eV/Å³), the virial route (0 for a free system)."""
        if not periodic:
            return jnp.zeros((), dtype)
        return quantity.pressure(energy, state.position, box_of(state), kinetic(state, start), neighbor=nbrs)

    langevin = cfg.ensemble == "nvt-langevin"

    def sampled_momentum(state):
        """The momenta after a step at the point the thermostat samples. Langevin (jax-md's BAOAB): right after
        its O step, p − (Δt/2)·F(x) (undoing the last half kick B); at the end of the step the momenta of a mode of
        frequency ω carry a kinetic temperature low by (ωΔt)²/4 (−2 % for a C–H stretch at 0.5 fs), at the O step
        it is exact. OpenMM's LangevinMiddleIntegrator keeps the same mid-step velocities. Other ensembles: p."""
        return state.momentum - 0.5 * dt * state.force if langevin else state.momentum

    def kinetic(state, start: bool = False):
        """E_kin (eV) of the momenta after a step (`sampled_momentum`), or of the start's own (``start``)."""
        return quantity.kinetic_energy(momentum=state.momentum if start else sampled_momentum(state), mass=state.mass)

    dof = thermo.degrees_of_freedom(N)  # the COM momentum starts at zero and stays zero in every ensemble

    def temperature(state):
        return thermo.kinetic_temperature_k(sampled_momentum(state), state.mass, dof)

    def one_step(carry, kT):
        state, nbrs = carry
        if berendsen:  # ASE's NVTBerendsen: rescale with the temperature before the step, λ clipped to [0.9, 1.1]
            t_now = 2.0 * kinetic(state) / dof
            lam = jnp.clip(jnp.sqrt(1.0 + (dt / tau) * (kT / jnp.maximum(t_now, 1e-12) - 1.0)), 0.9, 1.1)
            state = dataclasses.replace(state, momentum=state.momentum * lam)
            state = apply_fn(state, neighbor=nbrs)
        elif cfg.ensemble == "nve":
            state = apply_fn(state, neighbor=nbrs)
        else:
            state = apply_fn(state, neighbor=nbrs, kT=kT)
        if cfg.ensemble == "nvt-langevin":  # the noise off the COM: BAOAB on the 3N − 3 internal coordinates
            state = dataclasses.replace(state, momentum=thermo.remove_com_momentum(state.momentum, state.mass))
        b = box_of(state)
        nbrs = tri_overflow(
            state.position, nbrs.update(state.position, box=b) if npt else nbrs.update(state.position), b
        )
        # keep the carry's dtypes (jax-md builds some thermostat fields, e.g. the Nosé–Hoover chain masses, in float32)
        state = jax.tree_util.tree_map(lambda x, ref: x.astype(ref.dtype), state, carry[0])
        step_disp = jnp.max(jnp.linalg.norm(state.momentum / state.mass, axis=1)) * dt
        return (state, nbrs), (temperature(state), step_disp)

    @jax.jit
    def chunk(state, nbrs, kTs):
        (state, nbrs), (temps, disp) = jax.lax.scan(one_step, (state, nbrs), kTs)
        b = box_of(state)
        e_pot = energy(state.position, nbrs, box=b)
        return state, nbrs, temps, disp, e_pot, kinetic(state), pressure(state, nbrs), b

    def cartesian(u, b) -> tuple[np.ndarray, np.ndarray | None]:
        """Positions (Å) and cell in the structure's own orientation: x = u·cell·s, s the NPT length scale."""
        if not periodic:
            return np.asarray(u), None
        c = cell * float(np.asarray(b)[0, 0] / np.asarray(box)[0, 0])
        return np.asarray(u, float) @ c, c

    def to_input_frame(v) -> np.ndarray:
        """Cartesian vectors (N, 3) of jax-md's frame (the standard, lower-triangular cell) in the structure's."""
        return np.asarray(v, float) if rotation is None else np.asarray(v, float) @ rotation

    def allocate(R, b, **kw):
        return neighbor_fn.allocate(R, box=b, **kw) if npt else neighbor_fn.allocate(R, **kw)

    species_j = jnp.asarray(numbers, jnp.int32)

    @jax.jit
    def stress_fn(R, idx, b):  # (3, 3) eV/Å³: the potential part (1/V)·∂E/∂ε, ASE's sign; periodic runs only
        return pot(params, _graph(pot, species_j, b, True, R, idx), compute_stress=True)["stress"][0]

    def stress_in_input_frame(R, idx, b) -> np.ndarray:
        sigma = np.asarray(stress_fn(R, idx, b), float)
        return sigma if rotation is None else rotation.T @ sigma @ rotation

    key = jax.random.PRNGKey(cfg.seed)
    if capacity_from is not None and periodic:  # Cartesian → fractional
        capacity_from = np.asarray(capacity_from) @ np.linalg.inv(cell)
    nbrs = neighbor_fn.allocate(R0 if capacity_from is None else jnp.asarray(capacity_from, dtype))
    reallocations = 0
    if nbrs.update(R0).did_buffer_overflow:  # the list must hold the starting structure before forces are taken
        old = nbrs.idx.shape
        nbrs = neighbor_fn.allocate(R0)
        reallocations += 1
        log.warning(
            "MD step 0: neighbour list overflow (capacity %s); reallocated to %s (nothing dropped)", old, nbrs.idx.shape
        )
    # the same start as the ASE engine: Maxwell–Boltzmann, mass-weighted COM removal, exactly at T0 (3N − 3)
    p0 = thermo.maxwell_boltzmann_momenta(atoms.get_masses(), kT0 / KB_EV_PER_K, cfg.seed)
    p0 = jnp.asarray(p0 if rotation is None else p0 @ rotation.T, dtype)  # into jax-md's frame
    if cfg.ensemble == "nve" or berendsen:
        state = jax.jit(init_fn)(key, R0, kT0, mass=mass, momenta=p0, neighbor=nbrs)
    elif npt:
        state = jax.jit(init_fn)(key, R0, box, mass=mass, momenta=p0, kT=kT0, neighbor=nbrs)
        # jax-md's chain counts 3N; the atoms have 3N − 3 (their total momentum is zero and conserved)
        state = state.set(thermostat=state.thermostat.set(degrees_of_freedom=dof))
    else:
        state = jax.jit(init_fn)(key, R0, mass=mass, momenta=p0, kT=kT0, neighbor=nbrs)
    if cfg.ensemble == "nvt-nose-hoover":  # jax-md's chain counts 3N; the atoms have 3N − 3 (P = 0 is conserved)
        state = state.set(chain=state.chain.set(degrees_of_freedom=dof))
    ref_e = float(pot.reference.table()[numbers].sum() + pot.reference.intercept_ev)
    x0, c0 = cartesian(R0, box)
    e0, pressure0 = jax.jit(lambda st, nb: (energy(st.position, nb), pressure(st, nb, True)))(state, nbrs)
    rec = new_records()
    add_record(
        rec,
        step=0,
        potential_ev=float(e0) + ref_e,
        kinetic_ev=float(kinetic(state, start=True)),
        temperature_k=float(thermo.kinetic_temperature_k(state.momentum, state.mass, dof)),
        positions=x0,
        forces=to_input_frame(state.force),
        velocities=to_input_frame(state.momentum / state.mass),
        cells=c0,
        pressure_bar=float(pressure0) / EV_PER_A3_PER_BAR if periodic else None,
        stress=stress_in_input_frame(R0, nbrs.idx, box) if periodic else None,
    )
    fragments0 = None if periodic else guards.n_fragments(np.asarray(R0), pot.cutoff)
    stopped = None
    n_chunks = -(-cfg.steps // cfg.save_every)
    t_start, compile_s = time.perf_counter(), 0.0
    bar = tqdm(total=cfg.steps, desc=f"MD {cfg.ensemble}", unit="step", disable=not progress, dynamic_ncols=True)
    step = 0
    halt = monitor is not None and monitor(0, rec["positions"][0])
    try:
        for c in range(0 if halt else n_chunks):
            n = min(cfg.save_every, cfg.steps - step)
            kTs = jnp.asarray(cfg.target_k(np.arange(step + 1, step + n + 1)) * KB_EV_PER_K, dtype)
            t0 = time.perf_counter()
            new_state, new_nbrs, temps, disp, e_pot, e_kin, p_now, b_now = chunk(state, nbrs, kTs)
            if new_nbrs.did_buffer_overflow or (npt and new_nbrs.cell_size_too_small):
                # (under NPT a shrinking box also needs larger cells of the cell list)
                old = nbrs.idx.shape
                nbrs = allocate(state.position, box_of(state), extra_capacity=max(2, old[1] // 4))
                reallocations += 1
                log.warning(
                    "MD step %d: neighbour list overflow (capacity %s); reallocated to %s and re-ran the "
                    "chunk (one recompilation; nothing dropped)",
                    step,
                    old,
                    nbrs.idx.shape,
                )
                new_state, new_nbrs, temps, disp, e_pot, e_kin, p_now, b_now = chunk(state, nbrs, kTs)
                if new_nbrs.did_buffer_overflow or (npt and new_nbrs.cell_size_too_small):
                    raise RuntimeError(f"MD step {step}: neighbour list overflows again after reallocation")
            temps = np.asarray(temps)
            if c == 0:  # the first chunk includes the compilation
                compile_s = time.perf_counter() - t0
            pos, c_now = cartesian(new_state.position, b_now)
            if npt and np.all(np.isfinite(pos)) and np.min(cell_heights(c_now)) < 2 * pot.cutoff:
                stopped = (
                    f"MD stopped at step {step + n} (t = {(step + n) * cfg.dt_fs:.1f} fs): the NPT cell shrank to "
                    f"heights {np.round(cell_heights(c_now), 2).tolist()} Å, below twice the cutoff "
                    f"({2 * pot.cutoff:.2f} Å) where minimum image fails; use a larger --supercell"
                )
                break
            e_tot = float(e_pot) + ref_e + float(e_kin)
            err = abs(e_tot - rec["potential_ev"][0] - rec["kinetic_ev"][0]) / N if cfg.ensemble == "nve" else None
            fail = guards.failure(cfg, temps, np.asarray(disp), pos, float(e_pot), err, fragments0, pot.cutoff)
            if fail is not None:
                k, what = fail
                stopped = (
                    f"MD blew up at step {step + k + 1} (t = {(step + k + 1) * cfg.dt_fs:.1f} fs): {what}; "
                    f"last recorded temperature {rec['temperature_k'][-1]:.0f} K"
                )
                break
            state, nbrs = new_state, new_nbrs
            step += n
            add_record(
                rec,
                step=step,
                potential_ev=float(e_pot) + ref_e,
                kinetic_ev=float(e_kin),
                temperature_k=float(temps[-1]),
                positions=pos,
                forces=to_input_frame(new_state.force),
                velocities=to_input_frame(sampled_momentum(new_state) / new_state.mass),
                cells=c_now,
                pressure_bar=float(p_now) / EV_PER_A3_PER_BAR if periodic else None,
                stress=stress_in_input_frame(new_state.position, new_nbrs.idx, b_now) if periodic else None,
            )
            bar.update(n)
            bar.set_postfix(T=f"{temps[-1]:.0f}K", refresh=False)
            if monitor is not None and monitor(step, pos):
                break
    finally:
        bar.close()
    wall = time.perf_counter() - t_start - compile_s
    if stopped:
        log.error(stopped)
        if raise_on_blowup:
            raise MDBlowUp(stopped)
    return MDResult.from_records(
        rec, cfg.dt_fs, N, wall_s=wall, compile_s=compile_s, reallocations=reallocations, stopped=stopped, n_dof=dof
    )
