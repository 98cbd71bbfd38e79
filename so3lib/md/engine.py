"""Molecular dynamics on the device with jax-md, driven by a trained so3lib potential.

Units: Å, eV, amu; time in fs at the interface (the internal unit is Å·sqrt(amu/eV) = 10.1805 fs), temperature
in K (kT in eV inside). The neighbour list is jax-md's (Dense format, cutoff + skin, rebuilt when an atom moved
more than skin/2); each chunk of ``save_every`` steps runs inside one compiled `lax.scan`. After every chunk the
host checks, in this order: neighbour-list overflow (the list is reallocated with more capacity and the chunk is
re-run from its start: nothing is dropped), non-finite values and a runaway temperature (`MDBlowUp`, naming the
step).

Ensembles: NVE velocity Verlet, NVT Langevin and Nosé–Hoover chains (jax-md), and a Berendsen thermostat
(velocity rescaling on top of jax-md's velocity Verlet) whose target can ramp linearly from T0 to T1.
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

from so3lib.potential import Potential

log = logging.getLogger(__name__)
KB_EV_PER_K = 8.617333262e-5
FS_PER_TIME_UNIT = 10.180505710774743  # Å·sqrt(amu/eV) in fs
Ensemble = Literal["nve", "nvt-langevin", "nvt-nose-hoover", "berendsen"]


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
    skin_angstrom: float = Field(1.0, ge=0)
    capacity_multiplier: float = Field(1.25, ge=1.0)
    max_temperature_k: float = Field(10000.0, gt=0, description="stop the run above this temperature")
    seed: int = 0

    @model_validator(mode="after")
    def _check(self):
        if not self.dt_fs > 0:
            raise ValueError(f"the time step must be positive, got dt_fs={self.dt_fs}")
        if self.ramp_k is not None and self.ensemble == "nve":
            raise ValueError("a temperature ramp needs a thermostat (berendsen, nvt-langevin or nvt-nose-hoover)")
        return self

    def target_k(self, step: np.ndarray) -> np.ndarray:
        if self.ramp_k is None:
            return np.full(np.shape(step), self.temperature_k, float)
        t0, t1 = self.ramp_k
        return t0 + (t1 - t0) * np.asarray(step, float) / self.steps


@dataclasses.dataclass
class MDResult:
    """Per record (every ``save_every`` steps, including step 0): step, time_fs, potential/kinetic/total
    energy (eV, potential including the per-element reference), temperature (K) = 2·E_kin / (n_dof·k_B),
    positions (Å)."""

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

    @property
    def total_ev(self) -> np.ndarray:
        return self.potential_ev + self.kinetic_ev

    @property
    def steps_per_s(self) -> float:
        return float(self.step[-1]) / max(self.wall_s, 1e-9)


def _graph(
    pot: Potential,
    species: jnp.ndarray,
    cell: jnp.ndarray,
    periodic: bool,
    R: jnp.ndarray,
    idx: jnp.ndarray,
    triplet_fraction: float = 1.0,
) -> jraph.GraphsTuple:
    """Padded graph of one structure from a jax-md Dense neighbour list ``idx`` (N, K) (padding value N):
    edges j → i for idx[i, k] = j, real edges first (jraph convention), periodic shifts by minimum image.
    Angular models get the exact triplets inside their angular cutoff, ``triplet_fraction`` of the slot pairs
    (`so3lib.md.triplets`)."""
    N, K = idx.shape
    dt = pot.dtype
    recv = jnp.repeat(jnp.arange(N), K)
    send = idx.reshape(-1)
    valid = send < N
    order = jnp.argsort(~valid, stable=True)
    recv, send, valid = jnp.where(valid[order], recv[order], N), send[order], valid[order]
    n_real = jnp.sum(valid)
    Rp = jnp.concatenate([R.astype(dt), jnp.zeros((1, 3), dt)])
    if periodic:
        d = jax.lax.stop_gradient(Rp[send] - Rp[recv])
        shift = jnp.where(valid[:, None], -jnp.round(d @ jnp.linalg.inv(cell)), 0.0)
    else:
        shift = jnp.zeros((N * K, 3), dt)
    cells = jnp.stack([cell, jnp.zeros((3, 3), cell.dtype)]).astype(dt)
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
        e1, e2, tmask, _ = triplets.exact_triplets(R, idx, cell, periodic, pot.model.triplet_cutoff, cap)
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
    pot: Potential, params, numbers: np.ndarray, cell: np.ndarray, periodic: bool, triplet_fraction: float = 1.0
):
    """``energy(R, neighbor) -> E_residual`` (eV, without the constant per-element reference) for jax-md."""
    species = jnp.asarray(numbers, jnp.int32)
    cell = jnp.asarray(cell, pot.dtype)

    def energy(R, neighbor, **unused):
        g = _graph(pot, species, cell, periodic, R, neighbor.idx, triplet_fraction)
        return pot.residual_energy(params, g)[0]

    return energy


def _triplet_capacity(pot: Potential, neighbor_fn, R0, cell, periodic: bool, multiplier: float):
    """(fraction of the slot pairs kept as triplet capacity, ``f(R, nbrs) -> nbrs`` that marks a triplet
    overflow as a neighbour-list overflow: the engine then reallocates a larger list, whose capacity grows
    with it, and re-runs the chunk)."""
    tc = pot.model.triplet_cutoff
    if tc is None:
        return 1.0, lambda R, nbrs: nbrs
    from jax_md import partition

    from so3lib.md import triplets

    idx = neighbor_fn.allocate(R0).idx
    n0 = int(triplets.count_triplets(R0, idx, cell, periodic, tc))
    fraction = triplets.fraction_for(n0, idx.shape[0], idx.shape[1], multiplier)
    log.info("MD: %d angular triplets at step 0; capacity %.3g of the neighbour slot pairs", n0, fraction)

    def overflow(R, nbrs):
        N, K = nbrs.idx.shape
        over = triplets.count_triplets(R, nbrs.idx, cell, periodic, tc) > triplets.capacity(N, K, fraction)
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
) -> MDResult:
    """Run MD of ``atoms`` (ase.Atoms; positions Å, masses amu; periodic if all pbc) with ``cfg``. A blow-up
    raises `MDBlowUp` naming the step, or with ``raise_on_blowup=False`` returns the records up to it with
    ``stopped`` set. ``capacity_from``: positions to size the first neighbour list with (tests the overflow
    path with a list allocated too small)."""
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
    dtype = pot.dtype
    N = len(atoms)
    cell = np.asarray(atoms.cell.array, float)
    rc = pot.cutoff + cfg.skin_angstrom
    if periodic:
        heights = abs(np.linalg.det(cell)) / np.linalg.norm(np.cross(cell[[1, 2, 0]], cell[[2, 0, 1]]), axis=1)
        if np.any(heights < 2 * rc):
            raise ValueError(
                f"cell heights {np.round(heights, 2).tolist()} Å are below twice the cutoff + skin "
                f"({2 * rc:.2f} Å): minimum image fails; use a larger --supercell"
            )
        displacement, shift = space.periodic_general(jnp.asarray(cell.T, dtype), fractional_coordinates=False)
        box = jnp.asarray(cell.T, dtype)
        R0 = jnp.asarray(atoms.get_positions(wrap=True), dtype)
    else:
        displacement, shift = space.free()
        box = jnp.asarray(100.0, dtype)
        R0 = jnp.asarray(atoms.positions, dtype)
    cell_list = periodic and N >= 2000
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
    )
    neighbor_fn = partition.neighbor_list(
        displacement,
        box,
        rc,
        dr_threshold=cfg.skin_angstrom,
        capacity_multiplier=cfg.capacity_multiplier,
        disable_cell_list=not cell_list,
        format=partition.Dense,
    )
    tri_fraction, tri_overflow = _triplet_capacity(pot, neighbor_fn, R0, cell, periodic, cfg.capacity_multiplier)
    energy = energy_function(pot, params, numbers, cell, periodic, tri_fraction)
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
    else:
        init_fn, apply_fn = simulate.nve(energy, shift, dt)
    berendsen = cfg.ensemble == "berendsen"

    def kinetic(state):
        return quantity.kinetic_energy(momentum=state.momentum, mass=state.mass)

    # degrees of freedom: jax-md's Langevin thermalises the centre-of-mass momentum too (3N); the other
    # ensembles conserve it, and it starts at zero (3N − 3)
    dof = 3 * N if cfg.ensemble == "nvt-langevin" else max(3 * N - 3, 1)

    def temperature(state):
        return 2.0 * kinetic(state) / (dof * KB_EV_PER_K)

    def one_step(carry, kT):
        state, nbrs = carry
        if berendsen:
            state = apply_fn(state, neighbor=nbrs)
            t_now = 2.0 * kinetic(state) / dof
            lam = jnp.sqrt(jnp.clip(1.0 + (dt / tau) * (kT / jnp.maximum(t_now, 1e-12) - 1.0), 0.64, 1.44))
            state = dataclasses.replace(state, momentum=state.momentum * lam)
        elif cfg.ensemble == "nve":
            state = apply_fn(state, neighbor=nbrs)
        else:
            state = apply_fn(state, neighbor=nbrs, kT=kT)
        nbrs = tri_overflow(state.position, nbrs.update(state.position))
        # keep the carry's dtypes (jax-md builds some thermostat fields, e.g. the Nosé–Hoover chain masses, in float32)
        state = jax.tree_util.tree_map(lambda x, ref: x.astype(ref.dtype), state, carry[0])
        return (state, nbrs), temperature(state)

    @jax.jit
    def chunk(state, nbrs, kTs):
        (state, nbrs), temps = jax.lax.scan(one_step, (state, nbrs), kTs)
        return state, nbrs, temps, energy(state.position, nbrs), kinetic(state)

    key = jax.random.PRNGKey(cfg.seed)
    nbrs = neighbor_fn.allocate(R0 if capacity_from is None else jnp.asarray(capacity_from, dtype))
    reallocations = 0
    if nbrs.update(R0).did_buffer_overflow:  # the list must hold the starting structure before forces are taken
        old = nbrs.idx.shape
        nbrs = neighbor_fn.allocate(R0)
        reallocations += 1
        log.warning(
            "MD step 0: neighbour list overflow (capacity %s); reallocated to %s (nothing dropped)", old, nbrs.idx.shape
        )
    if cfg.ensemble == "nve" or berendsen:
        state = init_fn(key, R0, kT0, mass=mass, neighbor=nbrs)
    else:
        state = init_fn(key, R0, mass=mass, kT=kT0, neighbor=nbrs)
    ref_e = float(pot.reference.table()[numbers].sum() + pot.reference.intercept_ev)
    rec = {
        "step": [0],
        "pot": [float(energy(R0, nbrs)) + ref_e],
        "kin": [float(kinetic(state))],
        "T": [float(temperature(state))],
        "pos": [np.asarray(R0)],
    }
    stopped = None
    n_chunks = -(-cfg.steps // cfg.save_every)
    t_start, compile_s = time.perf_counter(), 0.0
    bar = tqdm(total=cfg.steps, desc=f"MD {cfg.ensemble}", unit="step", disable=not progress, dynamic_ncols=True)
    step = 0
    try:
        for c in range(n_chunks):
            n = min(cfg.save_every, cfg.steps - step)
            kTs = jnp.asarray(cfg.target_k(np.arange(step + 1, step + n + 1)) * KB_EV_PER_K, dtype)
            t0 = time.perf_counter()
            new_state, new_nbrs, temps, e_pot, e_kin = chunk(state, nbrs, kTs)
            if new_nbrs.did_buffer_overflow:
                old = nbrs.idx.shape
                nbrs = neighbor_fn.allocate(state.position, extra_capacity=max(2, old[1] // 4))
                reallocations += 1
                log.warning(
                    "MD step %d: neighbour list overflow (capacity %s); reallocated to %s and re-ran the "
                    "chunk (one recompilation; nothing dropped)",
                    step,
                    old,
                    nbrs.idx.shape,
                )
                new_state, new_nbrs, temps, e_pot, e_kin = chunk(state, nbrs, kTs)
                if new_nbrs.did_buffer_overflow:
                    raise RuntimeError(f"MD step {step}: neighbour list overflows again after reallocation")
            temps = np.asarray(temps)
            if c == 0:  # the first chunk includes the compilation
                compile_s = time.perf_counter() - t0
            bad = ~np.isfinite(temps) | (temps > cfg.max_temperature_k)
            pos = np.asarray(new_state.position)
            if bad.any() or not np.isfinite(pos).all() or not np.isfinite(float(e_pot)):
                k = int(np.argmax(bad)) if bad.any() else n - 1
                what = (
                    "non-finite values"
                    if not np.isfinite(temps[k]) or not np.isfinite(pos).all()
                    else f"temperature {temps[k]:.0f} K above the limit {cfg.max_temperature_k:.0f} K"
                )
                stopped = (
                    f"MD blew up at step {step + k + 1} (t = {(step + k + 1) * cfg.dt_fs:.1f} fs): {what}; "
                    f"last recorded temperature {rec['T'][-1]:.0f} K"
                )
                break
            state, nbrs = new_state, new_nbrs
            step += n
            rec["step"].append(step)
            rec["pot"].append(float(e_pot) + ref_e)
            rec["kin"].append(float(e_kin))
            rec["T"].append(float(temps[-1]))
            rec["pos"].append(pos)
            bar.update(n)
            bar.set_postfix(T=f"{temps[-1]:.0f}K", refresh=False)
    finally:
        bar.close()
    wall = time.perf_counter() - t_start - compile_s
    steps = np.asarray(rec["step"])
    if stopped:
        log.error(stopped)
        if raise_on_blowup:
            raise MDBlowUp(stopped)
    return MDResult(
        step=steps,
        time_fs=steps * cfg.dt_fs,
        potential_ev=np.asarray(rec["pot"]),
        kinetic_ev=np.asarray(rec["kin"]),
        temperature_k=np.asarray(rec["T"]),
        positions=np.stack(rec["pos"]),
        n_atoms=N,
        wall_s=wall,
        compile_s=compile_s,
        reallocations=reallocations,
        stopped=stopped,
    )
