"""The uncertainty of an ensemble (of models, or a shallow ensemble of readout heads) along an MD run: a
``monitor`` that `run_md` and `run_md_ase` call on every saved frame (step 0 included) with ``(step,
positions)``. It evaluates the ensemble there (one extra ensemble evaluation per saved frame) and records

    energy_std_ev (eV) and forces_std_max_ev_per_a = max_i ‖σ_F,i‖ (eV/Å; calibrated, see `so3lib.ensemble`),

and, with ``max_uncertainty`` (eV/Å, on forces_std_max), marks the frames above it or asks the engine to stop
there (``action="stop"``: the frame above the threshold is the last one recorded).
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from so3lib.ensemble import gives_spread

Action = Literal["stop", "mark"]


class UncertaintyMonitor:
    """``monitor(step, positions) -> bool`` (True: stop the run). Per call one entry in ``steps``,
    ``energy_std_ev``, ``forces_std_max_ev_per_a``, ``forces_std`` ((N, 3) eV/Å) and ``above``."""

    def __init__(
        self,
        potential,
        params,
        atoms,
        max_uncertainty: float | None = None,
        action: Action = "stop",
    ):
        from so3lib.calculator import So3libCalculator

        if not gives_spread(potential):
            raise ValueError(
                "an uncertainty monitor needs an ensemble (a run trained with --ensemble N or --readout-heads K)"
            )
        if max_uncertainty is not None and not max_uncertainty > 0:
            raise ValueError(f"max_uncertainty must be > 0 eV/Å, got {max_uncertainty}")
        if action not in ("stop", "mark"):
            raise ValueError(f"uncertainty action must be 'stop' or 'mark', got {action!r}")
        self.calc = So3libCalculator(potential, params, skin=0.0)
        self.atoms = atoms.copy()
        self.atoms.calc = None
        self.max_uncertainty, self.action = max_uncertainty, action
        self.steps: list[int] = []
        self.energy_std_ev: list[float] = []
        self.forces_std_max_ev_per_a: list[float] = []
        self.forces_std: list[np.ndarray] = []
        self.above: list[bool] = []
        self.stopped_at_step: int | None = None

    def __call__(self, step: int, positions: np.ndarray) -> bool:
        self.atoms.positions = np.asarray(positions, float)
        self.calc.calculate(self.atoms, ["energy", "forces"])
        f_std = self.calc.results["forces_std"]
        worst = float(np.max(np.linalg.norm(f_std, axis=1)))
        above = self.max_uncertainty is not None and not worst <= self.max_uncertainty  # NaN counts as above
        self.steps.append(int(step))
        self.energy_std_ev.append(self.calc.results["energy_std"])
        self.forces_std_max_ev_per_a.append(worst)
        self.forces_std.append(f_std)
        self.above.append(bool(above))
        if above and self.action == "stop":
            self.stopped_at_step = int(step)
            return True
        return False

    def report(self, dt_fs: float) -> dict:
        """The summary for md_results.json (per-frame values in the lists)."""
        first = next((k for k, a in enumerate(self.above) if a), None)
        fmax = np.asarray(self.forces_std_max_ev_per_a)
        return {
            "measure": "forces_std_max_ev_per_a = max over atoms of the norm of the calibrated ensemble force std",
            "max_uncertainty_ev_per_a": self.max_uncertainty,
            "action": self.action,
            "forces_std_max_ev_per_a": self.forces_std_max_ev_per_a,
            "energy_std_ev": self.energy_std_ev,
            "max_forces_std_ev_per_a": float(np.max(fmax)) if len(fmax) else None,
            "frames_above": int(sum(self.above)),
            "first_above": None
            if first is None
            else {"step": self.steps[first], "time_fs": self.steps[first] * dt_fs, "value": float(fmax[first])},
            "stopped": self.stopped_at_step is not None,
        }
