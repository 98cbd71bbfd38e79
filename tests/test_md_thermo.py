"""MD conventions without a trained model (issue #16): degrees of freedom, the Maxwell–Boltzmann start (exact
temperature, zero centre-of-mass momentum, no over-heated hydrogens), the extxyz trajectory read back by ASE,
the blow-up guards, and the stability verdict on real Li data (heated is not broken, molten is)."""

import json

import numpy as np
import pytest
from conftest import data

from so3lib.md import thermo
from so3lib.md.engine import MDConfig, MDResult

ETHANOL_MASSES = np.array([12.011, 12.011, 15.999] + [1.008] * 6)


def test_degrees_of_freedom():
    assert thermo.degrees_of_freedom(9) == 24 and thermo.degrees_of_freedom(9, com_fixed=False) == 27
    assert thermo.degrees_of_freedom(21) == 60
    with pytest.raises(ValueError, match="degrees of freedom of 0 atoms"):
        thermo.degrees_of_freedom(0)


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_maxwell_boltzmann_start_is_exact_with_zero_com_momentum(seed):
    p = thermo.maxwell_boltzmann_momenta(ETHANOL_MASSES, 300.0, seed)
    np.testing.assert_allclose(p.sum(axis=0), 0.0, atol=1e-14)
    assert thermo.kinetic_temperature_k(p, ETHANOL_MASSES, 24) == pytest.approx(300.0, rel=1e-13)
    np.testing.assert_array_equal(p, thermo.maxwell_boltzmann_momenta(ETHANOL_MASSES, 300.0, seed))
    assert not np.allclose(p, thermo.maxwell_boltzmann_momenta(ETHANOL_MASSES, 300.0, seed + 1))
    np.testing.assert_array_equal(thermo.maxwell_boltzmann_momenta(ETHANOL_MASSES, 0.0, seed), 0.0)


def test_mass_weighted_com_removal_does_not_heat_hydrogens():
    """Equipartition over 2000 starts: with the COM momentum fixed, atom i carries ⟨p_i²/2m_i⟩ = (3/2)·kT·(1 − m_i/M)
    (hydrogens and heavy atoms alike, within 4 %); subtracting the mean momentum per atom instead puts the
    excess on the light atoms."""
    kin = np.array(
        [
            0.5 * (thermo.maxwell_boltzmann_momenta(ETHANOL_MASSES, 300.0, s) ** 2).sum(1) / ETHANOL_MASSES
            for s in range(2000)
        ]
    ).mean(0)
    expected = 1.5 * thermo.KB_EV_PER_K * 300.0 * (1 - ETHANOL_MASSES / ETHANOL_MASSES.sum())
    np.testing.assert_allclose(kin / expected, 1.0, atol=0.04)
    # the old start (p − mean p, jax-md's), scaled to the same 3N − 3 temperature, is hot in the hydrogens
    rng = np.random.default_rng(0)
    p = rng.standard_normal((2000, 9, 3)) * np.sqrt(ETHANOL_MASSES * thermo.KB_EV_PER_K * 300.0)[None, :, None]
    p = p - p.mean(axis=1, keepdims=True)
    t_old = np.array([thermo.kinetic_temperature_k(x, ETHANOL_MASSES, 24) for x in p]).mean()
    assert t_old > 1.2 * 300.0, t_old  # a "300 K" start near 390 K


def test_remove_com_momentum_is_a_mass_weighted_projection():
    rng = np.random.default_rng(3)
    p = rng.standard_normal((9, 3))
    q = thermo.remove_com_momentum(p, ETHANOL_MASSES)
    np.testing.assert_allclose(q.sum(0), 0.0, atol=1e-14)
    np.testing.assert_allclose(thermo.remove_com_momentum(q, ETHANOL_MASSES), q, atol=1e-15)  # idempotent
    v_shift = (p - q) / ETHANOL_MASSES[:, None]  # every atom loses the same velocity: the COM velocity
    np.testing.assert_allclose(v_shift, np.broadcast_to(v_shift[0], v_shift.shape), atol=1e-14)


@pytest.mark.parametrize("integrator", ["NoseHooverChainNVT", "IsotropicMTKNPT"])
def test_ase_chains_are_at_rest_at_the_reported_temperature(integrator):
    """The chain so3lib gives ASE's Nosé–Hoover NVT and MTK NPT integrators has its fixed point at the
    temperature so3lib reports (3N − 3): momenta exactly at 300 K (zero total momentum) leave its first
    thermostat's force Σp²/m − n_dof·kT at zero, so half a step of the chain does not touch them. ASE's own
    chain counts 3N: it heats the same momenta (towards 300·27/24 = 337.5 K for ethanol)."""
    from ase import Atoms, units
    from ase.md import nose_hoover_chain as nhc

    from so3lib.md.ase_engine import _with_chain_for

    masses = ETHANOL_MASSES
    p = thermo.maxwell_boltzmann_momenta(masses, 300.0, seed=3)
    atoms = Atoms("C2OH6", positions=np.random.default_rng(0).normal(0, 2, (9, 3)), cell=np.eye(3) * 10, pbc=True)
    atoms.set_masses(masses)
    kw = dict(temperature_K=300.0, tdamp=50 * units.fs)
    if integrator == "IsotropicMTKNPT":
        kw.update(pressure_au=0.0, pdamp=500 * units.fs)
    ase_own = getattr(nhc, integrator)(atoms, 0.5 * units.fs, **kw)
    ours = _with_chain_for(getattr(nhc, integrator)(atoms, 0.5 * units.fs, **kw), 300.0, 50 * units.fs, 24)
    dt = 5 * units.fs
    kept = ours._thermostat.integrate_nhc(p.copy(), dt)
    heated = ase_own._thermostat.integrate_nhc(p.copy(), dt)
    t_kept, t_heated = (thermo.kinetic_temperature_k(q, masses, 24) for q in (kept, heated))
    # (ASE's k_B is CODATA 2014's, so3lib's 2018's: 3e-7 apart, hence not exactly zero)
    np.testing.assert_allclose(kept, p, rtol=1e-8, atol=0)
    assert t_heated > 300.0 + 1e4 * abs(t_kept - 300.0), (t_kept, t_heated)


def test_block_standard_error_matches_the_spread_of_correlated_means():
    """An AR(1) series x_t = φ x_{t−1} + ε_t (φ = 0.95: correlation time ~20 samples, like a thermostatted
    temperature saved every 5 fs): over 400 independent series, the block-averaged standard error of each mean
    agrees with the true spread of the means, σ_ε / (1 − φ) / sqrt(n) (and the naive σ/sqrt(n) is 6× too small)."""
    rng = np.random.default_rng(0)
    phi, n, reps = 0.95, 4000, 400
    eps = rng.standard_normal((reps, n))
    x = np.empty_like(eps)
    x[:, 0] = eps[:, 0] / np.sqrt(1 - phi**2)  # stationary start
    for t in range(1, n):
        x[:, t] = phi * x[:, t - 1] + eps[:, t]
    stats = np.array([thermo.mean_and_standard_error(row) for row in x])
    exact = 1.0 / (1 - phi) / np.sqrt(n)  # the asymptotic SE of the mean
    assert np.std(stats[:, 0]) == pytest.approx(exact, rel=0.1)
    assert np.sqrt(np.mean(stats[:, 1] ** 2)) == pytest.approx(exact, rel=0.1)
    assert np.std(x[0]) / np.sqrt(n) < exact / 5
    assert np.isnan(thermo.mean_and_standard_error(np.r_[x[0], np.nan])[0])
    with pytest.raises(ValueError, match="block averaging needs ≥ 2 blocks of ≥ 2 values, got 30 values for 20"):
        thermo.mean_and_standard_error(np.ones(30))


def _result(positions, cell=None, seed=0, periodic=False):
    rng = np.random.default_rng(seed)
    r, n = positions.shape[:2]
    return MDResult(
        step=np.arange(r) * 10,
        time_fs=np.arange(r) * 5.0,
        potential_ev=rng.normal(size=r) - 1000.0,
        kinetic_ev=np.abs(rng.normal(size=r)),
        temperature_k=300 + rng.normal(size=r),
        positions=positions,
        n_atoms=n,
        wall_s=1.0,
        compile_s=0.0,
        reallocations=0,
        forces=rng.normal(size=(r, n, 3)),
        velocities=rng.normal(size=(r, n, 3)) * 0.01,
        stress=(lambda s: s + np.swapaxes(s, 1, 2))(rng.normal(size=(r, 3, 3))) * 1e-3 if periodic else None,
        cells=cell,
    )


@pytest.mark.parametrize("periodic", [False, True])
def test_extxyz_round_trip_through_ase(tmp_path, periodic):
    import ase.io
    from ase import Atoms

    from so3lib.md.io import write_trajectory

    rng = np.random.default_rng(1)
    atoms = Atoms("C2OH6", positions=rng.normal(size=(9, 3)) * 1.5)
    cells = None
    if periodic:
        atoms.cell, atoms.pbc = np.diag([9.0, 9.5, 10.0]), True
        cells = np.stack([np.diag([9.0, 9.5, 10.0]) * (1 + 0.01 * k) for k in range(4)])
    res = _result(rng.normal(size=(4, 9, 3)), cells, periodic=periodic)
    write_trajectory(tmp_path / "t.extxyz", atoms, res)
    back = ase.io.read(tmp_path / "t.extxyz", index=":")
    assert len(back) == 4 and not (tmp_path / "t.extxyz.part").exists()
    for k, f in enumerate(back):
        assert f.get_chemical_symbols() == atoms.get_chemical_symbols()
        np.testing.assert_allclose(f.positions, res.positions[k], atol=1e-7)
        assert f.get_potential_energy() == pytest.approx(res.potential_ev[k], abs=1e-7)
        np.testing.assert_allclose(f.get_forces(), res.forces[k], atol=1e-7)
        np.testing.assert_allclose(f.get_velocities(), res.velocities[k], atol=1e-8)  # momenta: 8 decimals
        assert f.info["time_fs"] == res.time_fs[k] and f.info["temperature_k"] == pytest.approx(res.temperature_k[k])
        if periodic:
            np.testing.assert_allclose(f.cell.array, cells[k], atol=1e-7)
            np.testing.assert_allclose(f.get_stress(voigt=False), res.stress[k], atol=1e-9)
            assert f.pbc.all()
        else:
            assert not f.pbc.any()


def test_guards_name_the_reason():
    from so3lib.md import guards

    cfg = MDConfig(dt_fs=50.0)
    pos = np.random.default_rng(0).normal(size=(9, 3))
    ok = dict(positions=pos, potential_ev=-1.0, energy_error_ev_per_atom=None, fragments0=None, cutoff_angstrom=5.0)
    assert guards.failure(cfg, [300, 310], [0.01, 0.02], **ok) is None
    assert guards.failure(cfg, [300, np.nan], [0.01, 0.02], **ok) == (1, "non-finite values")
    k, why = guards.failure(cfg, [300, 2e4], [0.01, 0.02], **ok)
    assert k == 1 and why == "temperature 20000 K above the limit 10000 K"
    k, why = guards.failure(cfg, [300, 300], [0.1, 1.3], **ok)
    assert k == 1 and why == "an atom moved 1.30 Å in one step (limit 0.5 Å): the time step 50.0 fs is too large"
    k, why = guards.failure(cfg, [300, 300], [0.1, 0.1], **{**ok, "energy_error_ev_per_atom": 0.3})
    assert why == "the NVE total energy moved 300 meV/atom from its start (limit 100 meV/atom): energy is not conserved"


def test_a_molecule_that_flew_apart_is_caught():
    import so3lib.data as d
    from so3lib.md import guards

    eth = d.read(d.bundled_path(d.samples.RMD17_ETHANOL_TEST))[0].to_ase()
    assert guards.n_fragments(eth.positions, 5.0) == 1
    apart = eth.positions.copy()
    apart[-1] += [12.0, 0.0, 0.0]  # a hydrogen 12 Å away: beyond the cutoff, it feels no force
    kw = dict(potential_ev=-1.0, energy_error_ev_per_atom=None, fragments0=1, cutoff_angstrom=5.0)
    assert guards.failure(MDConfig(), [300.0], [0.01], eth.positions, **kw) is None
    k, why = guards.failure(MDConfig(), [300.0], [0.01], apart, **kw)
    assert why == "the molecule flew apart: 2 pieces more than the cutoff 5.00 Å apart (started as 1)"


def _li_bcc_sites(cell: np.ndarray, positions: np.ndarray, nearest: bool = True) -> np.ndarray:
    """The ideal 3×3×3 bcc sites of a 54-site mlearn Li cell aligned with ``positions``: the one nearest to each
    atom, or (``nearest=False``) all 54."""
    f = np.array([[i, j, k] for i in range(3) for j in range(3) for k in range(3)], float)
    sites = np.concatenate([f, f + 0.5]) @ (cell / 3)
    shift = np.zeros(3)
    for _ in range(5):  # align the lattice with the structure (AIMD cells drift)
        v = (positions - shift)[:, None] - sites[None]
        fr = v @ np.linalg.inv(cell)
        v = (fr - np.round(fr)) @ cell
        k = np.argmin(np.linalg.norm(v, axis=-1), axis=1)
        shift += v[np.arange(len(positions)), k].mean(0)
    return (sites[k] if nearest else sites) + shift


def _li(group_temperature: str):
    cells = json.loads(data("materials", "li_mlearn_training_every6.json").read_text())
    picked = [s for s in cells if group_temperature in s["description"]]
    cell = np.array(picked[0]["structure"]["lattice"]["matrix"])
    return cell, np.array([[x["xyz"] for x in s["structure"]["sites"]] for s in picked])


def test_a_li_vacancy_cell_that_only_heated_is_not_failed():
    """Real DFT data (mlearn Li): the 53-atom vacancy cell on its ideal sites, then its 300 K AIMD snapshots. The
    RDF similarity to the first frame falls to ~0.65 (< 0.8: the old verdict FAILED), yet every atom stays at a
    site: the verdict is no failure."""
    from so3lib.workflows.md_report import analyse

    cell, snaps = _li("Vacancy AIMD NVT simulation at 300 K")
    assert snaps.shape == (6, 53, 3)
    frames = np.concatenate([_li_bcc_sites(cell, snaps[0])[None], snaps])
    res = _result(frames)
    res.temperature_k = np.array([0.0] + [300.0] * 6)
    cfg = MDConfig(ensemble="berendsen", ramp_k=(0.0, 300.0), steps=60)
    out, _ = analyse(res, np.full(53, 3), cell, np.ones(3, bool), cfg, 0.8, 6.0)
    assert max(out["rdf_similarity"][1:]) < 0.8 and out["rdf_below_threshold"] is not None
    assert max(out["site_loss"]) < out["site_loss_threshold"]
    assert out["failure"] is None and out["stable"] and out["verdict"] == "stable"


def test_molten_li_and_atoms_too_close_are_failed():
    """A 680 K AIMD snapshot of the 54-atom Li cell (molten) against its ideal bcc sites: lattice lost. A frame with
    two atoms pushed to 0.5 Å: too close."""
    from so3lib.workflows.md_report import analyse

    cell, snaps = _li("expanded structure at 680 K")
    melt = snaps[0]
    frames = np.stack([_li_bcc_sites(cell, melt, nearest=False), melt])
    res = _result(frames)
    cfg = MDConfig(ensemble="nvt-langevin", temperature_k=680.0, steps=10)
    out, _ = analyse(res, np.full(54, 3), cell, np.ones(3, bool), cfg, 0.8, 6.0)
    assert out["site_loss"][1] > out["site_loss_threshold"] and out["verdict"] == "failed"
    assert out["failure"]["criterion"].startswith("lattice lost") and out["failure"]["time_fs"] == 5.0
    close = snaps[0].copy()
    close[1] = close[0] + [0.5, 0.0, 0.0]
    out, _ = analyse(_result(np.stack([snaps[0], close])), np.full(54, 3), cell, np.ones(3, bool), cfg, 0.8, 6.0)
    assert out["failure"]["criterion"].startswith("atoms too close")
