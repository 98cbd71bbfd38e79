"""MD at scale and under pressure (issue #16): the on-device engine's cell list (fractional coordinates) gives the
energies, forces and pressure of the all-pairs search and of the ASE calculator, and the same trajectory; NPT
(jax-md and ASE) shrinks the cell under pressure and holds the target pressure; the memory estimate of a cell
list is linear in N. A tiny float64 SchNet trained on the real Li cells of mlearn."""

import numpy as np
import pytest
from conftest import data

import so3lib.data as d
from so3lib.calculator import So3libCalculator
from so3lib.md import MDConfig, run_md
from so3lib.md import engine as E
from so3lib.models import make_config
from so3lib.training import DataConfig, RunConfig, load_potential, train


@pytest.fixture(scope="session")
def li_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("md_scale") / "run"
    ds = d.read(data("materials", "li_mlearn_training_every6.json"))
    cfg = RunConfig(
        model=make_config("schnet", n_atom_basis=8, n_interactions=1, cutoff=4.0, dtype="float64"),
        training={
            "batch_size": 8,
            "max_epochs": None,
            "max_steps": 300,
            "eval_every_steps": 150,
            "learning_rate": 3e-3,
        },
        data=DataConfig(energy_reference="average"),
    )
    train(cfg, ds.subset(np.arange(35)), ds.subset(np.arange(35, 41)), None, out_dir=out, progress=False)
    return load_potential(out)


@pytest.fixture(scope="session")
def li_cell():
    """The 54-atom bcc Li cell (9.93 Å) of the mlearn test set."""
    return d.read(data("materials", "li_mlearn_test.json"))[4].to_ase()


def _rotation(seed=3):
    q, r = np.linalg.qr(np.random.default_rng(seed).standard_normal((3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


def _engine_energy_forces(pot, params, atoms, cell_list: bool):
    """E (eV, residual) and Cartesian forces (eV/Å, the structure's own orientation) through the engine's
    jax-md energy function, in fractional coordinates, with or without jax-md's cell list."""
    import jax
    from jax_md import partition, space

    cell = atoms.cell.array
    std = E.standard_cell(cell)
    box = std.T
    disp, _ = space.periodic_general(box, fractional_coordinates=True)
    nl = partition.neighbor_list(
        disp, box, pot.cutoff, dr_threshold=0.5, disable_cell_list=not cell_list, fractional_coordinates=True
    )
    u = atoms.get_scaled_positions() % 1.0
    nbrs = nl.allocate(u)
    assert (nbrs.cell_list_fn is not None) == cell_list  # the cell list really is (not) used
    e, g = jax.jit(jax.value_and_grad(E.energy_function(pot, params, atoms.numbers, box, True)))(u, nbrs)
    return float(e), -np.asarray(g) @ np.linalg.solve(std, cell)  # std frame → the structure's frame


def test_cell_list_gives_the_all_pairs_and_ase_energies_and_forces(li_run):
    """A triclinic Li supercell (the 12-atom 60° cell of mlearn, 5×5×1: 300 atoms, ≥ 4 cells of cutoff + skin
    per side), rattled and turned to a general orientation (so the engine's standard-form rotation is exercised):
    energy, forces and pressure of the cell-list and the all-pairs search equal the So3libCalculator's. (The cubic
    bcc supercell is compared frame by frame in the trajectory test.)"""
    pot, params = li_run
    tri = d.read(data("materials", "li_mlearn_test.json"))[24].to_ase().repeat((5, 5, 1))
    for atoms in (tri,):
        atoms.rattle(0.05, seed=1)
        atoms.set_cell(atoms.cell.array @ _rotation().T, scale_atoms=True)  # a general orientation
        a = atoms.copy()
        a.calc = So3libCalculator(pot, params, skin=0.5)
        e_ref = a.get_potential_energy() - float(pot.reference.table()[a.numbers].sum() + pot.reference.intercept_ev)
        f_ref = a.get_forces()
        p_ref = -np.mean(a.get_stress()[:3])
        assert np.abs(f_ref).max() > 1e-3  # the forces are not trivially zero
        for cl in (False, True):
            e, f = _engine_energy_forces(pot, params, atoms, cl)
            assert e == pytest.approx(e_ref, abs=1e-9)
            np.testing.assert_allclose(f, f_ref, atol=1e-9)
        # the engine's pressure at T = 0 (virial route, −∂E/∂ε / 3V) is the calculator's −tr(σ)/3
        cfg = MDConfig(temperature_k=0.0, steps=1, save_every=1, skin_angstrom=0.5, cell_list=True)
        r = run_md(pot, params, atoms, cfg, progress=False)
        assert r.pressure_bar[0] * E.EV_PER_A3_PER_BAR == pytest.approx(p_ref, rel=1e-7, abs=1e-12)


@pytest.mark.slow  # energies and forces of both searches are compared in the default tier above
def test_cell_list_gives_the_same_trajectory(li_run, li_cell):
    """40 NVE steps of 432 Li atoms at 600 K: the same trajectory with and without the cell list, every frame's
    energy is the ASE calculator's, and the total energy is conserved."""
    pot, params = li_run
    atoms = li_cell.repeat((2, 2, 2))
    cfg = MDConfig(ensemble="nve", temperature_k=600, steps=40, dt_fs=1.0, save_every=10, skin_angstrom=0.5)
    a = run_md(pot, params, atoms, cfg.model_copy(update={"cell_list": False}), progress=False)
    b = run_md(pot, params, atoms, cfg.model_copy(update={"cell_list": True}), progress=False)
    np.testing.assert_allclose(b.positions, a.positions, rtol=0, atol=1e-8)
    np.testing.assert_allclose(b.potential_ev, a.potential_ev, rtol=0, atol=1e-8)
    assert np.ptp(a.potential_ev) > 10 * np.ptp(a.total_ev)  # the atoms move; the total energy stays
    calc = So3libCalculator(pot, params, skin=0.5)
    for x, e in zip(b.positions, b.potential_ev):
        f = atoms.copy()
        f.positions = x
        f.calc = calc
        assert f.get_potential_energy() == pytest.approx(e, abs=1e-8)


# jax-md's NPT compiles the barostat for two pressures (minutes on 2 cores): slow tier; ASE's runs by default
@pytest.mark.parametrize("engine", [pytest.param("jax-md", marks=pytest.mark.slow), "ase"])
def test_npt_volume_follows_the_pressure(li_run, li_cell, engine):
    """NPT at 300 K of the 54-atom Li cell at 0 and 20 kbar: the higher pressure gives the smaller volume, and the
    mean instantaneous pressure (second half) approaches each target within 2 kbar (a 54-atom cell fluctuates by
    several kbar)."""
    pot, params = li_run
    vol, press = {}, {}
    for p_bar in (0.0, 20_000.0):
        cfg = MDConfig(
            ensemble="npt",
            pressure_bar=p_bar,
            temperature_k=300,
            steps=1500 if engine == "jax-md" else 800,
            dt_fs=2.0,
            save_every=10,
            tau_fs=100.0,
            barostat_tau_fs=200.0,
            skin_angstrom=0.5,
            capacity_multiplier=2.0,  # room for the compressed cell: no reallocation, no recompilation
        )
        if engine == "ase":
            from so3lib.md.ase_engine import run_md_ase

            r = run_md_ase(So3libCalculator(pot, params, skin=0.5), li_cell, cfg, progress=False)
        else:
            r = run_md(pot, params, li_cell, cfg, progress=False)
        assert r.stopped is None
        half = len(r.step) // 2
        vol[p_bar], press[p_bar] = np.mean(r.volume_a3[half:]), np.mean(r.pressure_bar[half:])
        # isotropic: the cell keeps its shape
        np.testing.assert_allclose(r.cells[-1] / np.cbrt(r.volume_a3[-1]), r.cells[0] / np.cbrt(r.volume_a3[0]))
    assert vol[20_000.0] < 0.97 * vol[0.0], vol
    for p_bar, p in press.items():
        assert abs(p - p_bar) < 2000.0, press


def test_cell_list_memory_is_linear_in_n():
    """The estimate with a cell list grows linearly (a 3.4 M-atom Li cell: GBs, not the all-pairs tens of TB)."""
    from so3lib.md.memory import md_memory_bytes

    rho = 54 / 9.93**3
    est = {n: md_memory_bytes(n, n / rho, 6.0, True, 4, 64, 3) for n in (10**4, 10**5, 10**6)}
    assert est[10**6] / est[10**5] == pytest.approx(10.0, rel=0.05)
    assert est[10**5] / est[10**4] == pytest.approx(10.0, rel=0.05)
    big = md_memory_bytes(3_400_000, 3_400_000 / rho, 6.0, True, 4, 64, 3)
    assert big < 1e-2 * md_memory_bytes(3_400_000, 3_400_000 / rho, 6.0, False, 4, 64, 3)
