"""Temperature, degrees of freedom and Maxwell–Boltzmann starts, shared by every MD engine.

Units: momenta p in sqrt(amu·eV) (ASE's unit, and jax-md's with Å, eV, amu), masses m in amu, energies in eV,
temperatures in K. The kinetic temperature is

.. math::  T = 2 E_\\mathrm{kin} / (n_\\mathrm{dof} k_B), \\qquad E_\\mathrm{kin} = \\sum_i p_i^2 / 2 m_i.

One convention for every ensemble and both engines: the centre-of-mass (COM) momentum starts at zero and stays
zero (every so3lib potential is translation invariant, so its forces sum to zero; NVE, Berendsen and Nosé–Hoover
scale or integrate all momenta and keep P = 0; the Langevin noise is projected off the COM, mass-weighted).
The atoms then have ``n_dof = 3N − 3`` degrees of freedom, and every thermostat is set up so that it drives
⟨E_kin⟩ to n_dof·kT/2 (jax-md's Nosé–Hoover chain is given n_dof, ASE's integrators a `FixCom` constraint):
the reported temperature is the one the thermostat holds. (Counting 3N while P = 0 would settle a molecule at
T·3N/(3N − 3).)
"""

from __future__ import annotations

import numpy as np

KB_EV_PER_K = 8.617333262e-5  # CODATA 2018


def degrees_of_freedom(n_atoms: int, com_fixed: bool = True) -> int:
    """3N − 3 with the centre-of-mass momentum removed and conserved (so3lib's MD), 3N without."""
    if n_atoms < 1:
        raise ValueError(f"degrees of freedom of {n_atoms} atoms: need at least one atom")
    return max(3 * n_atoms - 3, 1) if com_fixed else 3 * n_atoms


def kinetic_energy_ev(momenta, masses):
    """Σ p²/2m (eV) of momenta (N, 3) and masses (N,) or (N, 1); numpy or jax arrays."""
    m = masses.reshape(-1, 1) if masses.ndim == 1 else masses
    return 0.5 * (momenta**2 / m).sum()


def kinetic_temperature_k(momenta, masses, n_dof: int):
    """2·E_kin / (n_dof·k_B) (K); numpy or jax arrays (usable inside a compiled step)."""
    return 2.0 * kinetic_energy_ev(momenta, masses) / (n_dof * KB_EV_PER_K)


def remove_com_momentum(momenta, masses):
    """p_i − m_i·P/M: the mass-weighted projection that zeroes the total momentum P and leaves the internal
    motion untouched (subtracting P/N from every atom instead would over-heat the light atoms)."""
    m = masses.reshape(-1, 1) if masses.ndim == 1 else masses
    return momenta - m * (momenta.sum(axis=0) / m.sum())


def maxwell_boltzmann_momenta(masses: np.ndarray, temperature_k: float, seed: int) -> np.ndarray:
    """(N, 3) momenta drawn from the Maxwell–Boltzmann distribution at ``temperature_k`` with numpy's
    ``default_rng(seed)``, the COM momentum removed (mass-weighted) and scaled so that the kinetic temperature
    with n_dof = 3N − 3 is exactly ``temperature_k``. The same seed gives the same start in every engine."""
    masses = np.asarray(masses, float)
    if masses.ndim != 1 or len(masses) < 2 or not np.all(masses > 0):
        raise ValueError(f"Maxwell–Boltzmann momenta need ≥ 2 positive masses, got {masses.tolist()[:5]}")
    if not (np.isfinite(temperature_k) and temperature_k >= 0):
        raise ValueError(f"temperature must be finite and ≥ 0 K, got {temperature_k}")
    if temperature_k == 0:
        return np.zeros((len(masses), 3))
    rng = np.random.default_rng(seed)
    p = rng.standard_normal((len(masses), 3)) * np.sqrt(masses * KB_EV_PER_K * temperature_k)[:, None]
    p = remove_com_momentum(p, masses)
    t_now = kinetic_temperature_k(p, masses, degrees_of_freedom(len(masses)))
    return p * np.sqrt(temperature_k / t_now)


def mean_and_standard_error(x, n_blocks: int = 20) -> tuple[float, float]:
    """(mean, standard error of the mean) of a correlated time series ``x`` (e.g. the temperature of every saved
    frame) by block averaging: the series is cut into ``n_blocks`` equal consecutive blocks (a remainder at the
    start is dropped) and

    .. math::  \\mathrm{SE} = \\mathrm{std}(\\bar x_b) / \\sqrt{n_b}

    over the block means x̄_b. Valid when a block is much longer than the correlation time (for a 20-atom molecule
    under a thermostat, tens of fs: blocks of ≥ 1 ps are safe); the SE itself is then known to ~1/sqrt(2 n_b)
    (16 % for 20 blocks). Non-finite values give NaN (never hidden)."""
    x = np.asarray(x, float).reshape(-1)
    if n_blocks < 2 or len(x) < 2 * n_blocks:
        raise ValueError(f"block averaging needs ≥ 2 blocks of ≥ 2 values, got {len(x)} values for {n_blocks} blocks")
    m = len(x) // n_blocks
    blocks = x[len(x) - m * n_blocks :].reshape(n_blocks, m).mean(axis=1)
    return float(np.mean(blocks)), float(np.std(blocks, ddof=1) / np.sqrt(n_blocks))
