"""Shared fixtures. Real reference data is read from ../shared/data (beside the project root, as in CI)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import jax
import numpy as np
import pytest

jax.config.update("jax_enable_x64", True)  # float64 models in physics tests; float32 models keep float32
os.environ.setdefault("TQDM_DISABLE", "1")
# One compilation cache for the whole test session (and the subprocesses it starts): tests that build the same
# model configuration share compiled programs. A fresh temporary directory each run, so nothing stale or foreign.
_CACHE = tempfile.mkdtemp(prefix="so3lib-jax-cache-")
os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SO3LIB_SHARED_DATA", ROOT.parent / "shared" / "data"))


def shared(*parts: str) -> Path:
    p = SHARED.joinpath(*parts)
    if not p.exists():
        raise FileNotFoundError(f"shared reference data {p} is missing: the tests read ../shared/data "
                                "(set SO3LIB_SHARED_DATA to its location)")
    return p


@pytest.fixture(scope="session")
def ethanol_train():
    import so3lib.data as d
    return d.read(shared("rmd17", "rmd17_ethanol_train_01.npz"))


@pytest.fixture(scope="session")
def ethanol_test():
    import so3lib.data as d
    return d.read(shared("rmd17", "rmd17_ethanol_test_01.npz"))


@pytest.fixture(scope="session")
def aspirin():
    import so3lib.data as d
    return d.read(shared("rmd17", "rmd17_aspirin_test_01.npz"))


@pytest.fixture(scope="session")
def li_test():
    import so3lib.data as d
    return d.read(shared("materials", "li_mlearn_test.json"))


@pytest.fixture(scope="session")
def tial():
    import so3lib.data as d
    return d.read(shared("materials", "tial_tutorial.xyz"))


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q
