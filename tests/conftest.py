"""Shared fixtures. The default run reads real data from ``tests/data/`` (small slices, see its README) and the
samples bundled in the package, so it passes from a plain clone. Tests marked ``data`` read the full reference
files from ``$SO3LIB_SHARED_DATA`` or ``../shared/data`` (run them with ``pytest -m data``)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import jax
import numpy as np
import pytest

# The tests compile many small programs and run each only briefly: XLA's backend optimisation passes cost more
# time than they save here (about a third of the compile time). Set before the backend starts; inherited by the
# subprocesses and notebook kernels the tests start. Results stay deterministic; only the tests use these flags.
os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true"]
).strip()
jax.config.update("jax_enable_x64", True)  # float64 models in physics tests; float32 models keep float32
os.environ.setdefault("TQDM_DISABLE", "1")
# One compilation cache for the whole test session, its pytest-xdist workers and the subprocesses it starts: tests
# that build the same model configuration share compiled programs. The first process (pytest itself, or the
# controller that starts the workers) makes a fresh temporary directory, so nothing stale or foreign, and removes
# it at the end; the workers inherit it through the environment.
_CACHE_OWNER = "SO3LIB_TEST_JAX_CACHE" not in os.environ
if _CACHE_OWNER:
    os.environ["SO3LIB_TEST_JAX_CACHE"] = tempfile.mkdtemp(prefix="so3lib-jax-cache-")
_CACHE = os.environ["SO3LIB_TEST_JAX_CACHE"]
os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
SHARED = Path(os.environ.get("SO3LIB_SHARED_DATA", ROOT.parent / "shared" / "data"))
BUNDLED = ROOT / "so3lib" / "data" / "bundled"
ETHANOL_TRAIN = BUNDLED / "rmd17_ethanol_train_01.npz"  # rMD17 ethanol split 01, all 1000 frames
ETHANOL_TEST = BUNDLED / "rmd17_ethanol_test_01.npz"
SPICE_SAMPLE = BUNDLED / "SPICE-1.1.4_n2.hdf5"


def data(*parts: str) -> Path:
    """A file of the committed test data (``tests/data``)."""
    p = DATA.joinpath(*parts)
    if not p.exists():
        raise FileNotFoundError(f"test data {p} is missing (regenerate it: python scripts/make_test_data.py)")
    return p


def shared(*parts: str) -> Path:
    """A full reference file, for tests marked ``data`` only."""
    p = SHARED.joinpath(*parts)
    if not p.exists():
        raise FileNotFoundError(
            f"full reference data {p} is missing: tests marked 'data' read $SO3LIB_SHARED_DATA or ../shared/data"
        )
    return p


# unit tier (`pytest -m unit`): pure functions over arrays and files, no training; the rest is `integration`
UNIT_MODULES = {
    "test_bad_input",
    "test_config",
    "test_docs",
    "test_graph",
    "test_labels_nonfinite",
    "test_labels_reference",
    "test_md_thermo",
    "test_model_physics",
    "test_packaging",
    "test_readers",
    "test_run_folder",
    "test_spice_preprocessing",
    "test_splits_reference",
}


def check_guards_and_monitor(run_engine, calc, molecule) -> None:
    """An engine's ``run_md_<engine>(calc, atoms, cfg, ...)``: dt = 50 fs flings ``molecule`` apart and the guards
    stop the run at its first saved frame (nothing after it recorded); a monitor is called on every saved frame
    and stops the run where it says so."""
    from so3lib.md import MDConfig

    fast = MDConfig(ensemble="nve", steps=40, dt_fs=50.0, save_every=10, max_temperature_k=1e9)
    r = run_engine(calc, molecule, fast, progress=False, raise_on_blowup=False)
    assert r.stopped.startswith("MD blew up by step 10 (t = 500.0 fs): ") and len(r.step) == 1, r.stopped
    seen = []

    def monitor(step, positions):
        seen.append((step, positions.copy()))
        return step >= 40

    cfg = MDConfig(ensemble="nvt-langevin", steps=100, dt_fs=0.5, save_every=20)
    r = run_engine(calc, molecule, cfg, progress=False, monitor=monitor)
    assert r.step.tolist() == [s for s, _ in seen] == [0, 20, 40] and r.stopped is None
    np.testing.assert_array_equal(r.positions, np.stack([p for _, p in seen]))


def check_spread_calibrated(pot, params, val):
    """A calibrated potential on its validation set: the RMS spread of forces and of energies equals the RMSE
    (s² = Σerr²/Σσ²). Returns (predictions, force errors)."""
    from so3lib import ensemble as E

    pred = E.predict_arrays(pot, params, val)
    f_err = pred["forces_ev_per_a"] - val.forces
    np.testing.assert_allclose(
        np.sqrt(np.mean(pred["forces_std_ev_per_a"] ** 2)), np.sqrt(np.mean(f_err**2)), rtol=1e-8
    )
    e_err = pred["energy_ev"] - val.energy
    np.testing.assert_allclose(np.sqrt(np.mean(pred["energy_std_ev"] ** 2)), np.sqrt(np.mean(e_err**2)), rtol=1e-8)
    return pred, f_err


def pytest_unconfigure(config):
    """The process that made the session's compilation cache removes it (the workers leave it alone)."""
    if _CACHE_OWNER:
        import shutil

        shutil.rmtree(_CACHE, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    """Tiers: ``unit`` for the modules in UNIT_MODULES, ``integration`` for the rest. A test that reads
    ``shared()`` must say so with the ``data`` marker (so the default run never needs it)."""
    import inspect

    for item in items:
        tier = "unit" if item.module.__name__ in UNIT_MODULES else "integration"
        item.add_marker(getattr(pytest.mark, tier))
        fn = getattr(item, "function", None)
        if fn is not None and "shared(" in inspect.getsource(fn) and item.get_closest_marker("data") is None:
            raise pytest.UsageError(f"{item.nodeid} reads shared() data but is not marked 'data'")


@pytest.fixture(scope="session")
def ethanol_train():
    import so3lib.data as d

    return d.read(ETHANOL_TRAIN)


@pytest.fixture(scope="session")
def ethanol_test():
    import so3lib.data as d

    return d.read(ETHANOL_TEST)


@pytest.fixture(scope="session")
def aspirin():
    import so3lib.data as d

    return d.read(data("rmd17", "rmd17_aspirin_test_01.npz"))


@pytest.fixture(scope="session")
def li_test():
    import so3lib.data as d

    return d.read(data("materials", "li_mlearn_test.json"))


@pytest.fixture(scope="session")
def tial():
    import so3lib.data as d

    return d.read(data("materials", "tial_first40.xyz"))


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def train_ethanol_schnet(out, n_atom_basis: int, n_train: int, val: range, training: dict) -> dict:
    """A float64 SchNet (T=2) trained on the first ``n_train`` frames of the bundled rMD17 ethanol split and
    validated on the frames ``val``."""
    import so3lib.data as d
    from so3lib.models import make_config
    from so3lib.training import DataConfig, RunConfig, train

    ds = d.read(ETHANOL_TRAIN)
    cfg = RunConfig(
        model=make_config("schnet", n_atom_basis=n_atom_basis, n_interactions=2, dtype="float64"),
        training={"batch_size": 16, "max_epochs": None, **training},
        data=DataConfig(energy_reference="average"),  # one molecule: least squares cannot fix e_Z
    )
    return train(cfg, ds.subset(np.arange(n_train)), ds.subset(np.asarray(val)), None, out_dir=out, progress=False)


@pytest.fixture(scope="session")  # session: built once per worker, whatever the order
def ethanol_run(tmp_path_factory):
    """The MD tests' small potential: a float64 SchNet (F=16, T=2) trained for 150 steps on 400 frames of the
    bundled rMD17 ethanol split (the jax-md, ASE, OpenMM and LAMMPS tests share it)."""
    out = tmp_path_factory.mktemp("md") / "run"
    res = train_ethanol_schnet(
        out, 16, 400, range(900, 950), {"max_steps": 150, "eval_every_steps": 75, "learning_rate": 3e-3}
    )
    assert res["val"]["forces_mae_ev_per_a"] < 1.0
    return out


@pytest.fixture(scope="session")
def ethanol():
    """Frame 0 of the bundled rMD17 ethanol test split (ase.Atoms, no calculator)."""
    import so3lib.data as d

    return d.read(ETHANOL_TEST)[0].to_ase()


@pytest.fixture(scope="session")
def aspirin_run(tmp_path_factory):
    """The slow MD tests' potential: a float64 SchNet (F=64, T=3) trained for 12 000 steps (cosine to 1 %) on
    1950 frames of rMD17 aspirin, the train and test files of split 01 (validation: the last 50 test frames). The
    thermostat test needs it stable for 20–40 ps at 300 K in four engines: the smaller one it replaces (F=32, T=2,
    3000 steps on 950 frames, forces MAE 149 meV/Å) blew up under LAMMPS Langevin and under jax-md and ASE
    Nosé–Hoover on 2026-12-02. Here it is a fixture for stability, not an accuracy figure (it has seen the test
    file). Reads ``shared()`` data: tests using it are marked ``data``."""
    import so3lib.data as d
    from so3lib.models import make_config
    from so3lib.training import DataConfig, RunConfig, train

    frames = d.Dataset.concatenate(
        [d.read(shared("rmd17", f"rmd17_aspirin_{part}_01.npz")) for part in ("train", "test")]
    )
    steps = 12_000
    cfg = RunConfig(
        model=make_config("schnet", n_atom_basis=64, n_interactions=3, dtype="float64"),
        training={
            "batch_size": 16,
            "max_epochs": None,
            "max_steps": steps,
            "schedule": "cosine",
            "decay_steps": steps,
            "warmup_steps": 200,
            "eval_every_steps": 3000,
        },
        data=DataConfig(energy_reference="average"),  # one molecule: least squares cannot fix e_Z
    )
    out = tmp_path_factory.mktemp("aspirin") / "run"
    n = len(frames)
    res = train(
        cfg, frames.subset(np.arange(n - 50)), frames.subset(np.arange(n - 50, n)), None, out_dir=out, progress=False
    )
    print(f"\naspirin SchNet: validation forces MAE {1e3 * res['val']['forces_mae_ev_per_a']:.0f} meV/Å")
    return out
