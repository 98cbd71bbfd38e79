"""Packaging: `import so3lib` loads no heavy dependency (jax, flax, e3nn-jax, orbax, jax-md load on first use), the
registry lists every model without importing it, every public name resolves, the version has one source, and
on-device MD without the optional jax-md says how to install it. Each check runs in a fresh interpreter."""

import subprocess
import sys
import tomllib
from importlib.metadata import version

import pytest
from conftest import ROOT

import so3lib


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)


def test_import_so3lib_loads_no_heavy_dependency():
    r = _python(
        "import sys, so3lib\n"
        "heavy = ('jax', 'flax', 'e3nn_jax', 'orbax', 'jax_md', 'matplotlib', 'scipy')\n"
        "print([m for m in heavy if m in sys.modules])"
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_registry_lists_models_by_name_and_imports_only_the_one_used():
    r = _python(
        "import sys\n"
        "from so3lib.models import available, make_config\n"
        "assert available() == ['bpnn', 'schnet', 'so3krates'], available()\n"
        "make_config('schnet', n_atom_basis=8)\n"
        "assert 'e3nn_jax' not in sys.modules and 'so3lib.models.so3krates' not in sys.modules\n"
        "make_config('so3krates', features=8, heads=2)\n"
        "assert 'e3nn_jax' in sys.modules\n"
        "print('ok')"
    )
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_every_public_name_resolves():
    for name in so3lib.__all__:
        assert getattr(so3lib, name) is not None, name
    import importlib

    for mod in (importlib.import_module("so3lib.training"), importlib.import_module("so3lib.md")):
        for name in mod.__all__:
            assert getattr(mod, name) is not None, (mod.__name__, name)
    with pytest.raises(AttributeError, match="module 'so3lib' has no attribute 'Potentail'"):
        so3lib.Potentail  # noqa: B018
    assert set(dir(so3lib)) >= {"load_calculator", "Potential", "read"}


def test_version_has_one_source_and_the_licence_ships():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in meta["project"] and meta["project"]["dynamic"] == ["version"]
    assert version("so3lib") == so3lib.__version__
    assert meta["project"]["license-files"] == ["LICENSE"] and "MIT License" in (ROOT / "LICENSE").read_text()
    assert meta["project"]["requires-python"] == ">=3.11"


def test_md_without_jax_md_names_the_extra():
    r = _python(
        "import sys\n"
        "sys.modules['jax_md'] = None  # as if the optional dependency were not installed\n"
        "import ase\n"
        "from so3lib.md import MDConfig, run_md\n"
        "try:\n"
        "    run_md(None, None, ase.Atoms('H2', positions=[[0, 0, 0], [0, 0, 0.74]]), MDConfig(), progress=False)\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    assert r.returncode == 0, r.stderr
    assert "on-device MD needs jax-md, an optional dependency: pip install 'so3lib[md]'" in r.stdout


def test_the_wheel_ships_so3lib_only_and_its_command_runs_from_an_empty_folder(tmp_path):
    """A non-editable install: the wheel's only top-level package is so3lib (no `experiments` to clash with a
    user's own), its `so3lib` console script works from any folder, and the bundled samples travel with it."""
    import os
    import zipfile

    r = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "wheel"), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    (whl,) = (tmp_path / "wheel").glob("so3lib-*.whl")
    names = zipfile.ZipFile(whl).namelist()
    top = zipfile.ZipFile(whl).read(next(n for n in names if n.endswith("top_level.txt"))).decode().split()
    assert top == ["so3lib"] and not [n for n in names if n.startswith("experiments")]
    assert "so3lib/data/bundled/SPICE-1.1.4_n2.hdf5" in names and "so3lib/cli/__init__.py" in names
    ep = zipfile.ZipFile(whl).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "so3lib = so3lib.cli:main" in ep
    site = tmp_path / "site"
    r = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(whl)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    r = subprocess.run(
        [str(site / "bin" / "so3lib"), "inspect", "--json-only"],
        cwd=empty,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert '"frames": 1000' in r.stdout and str(site) in r.stdout  # the bundled sample of the installed copy
    r = subprocess.run([sys.executable, "-c", "import experiments"], cwd=empty, env=env, capture_output=True, text=True)
    assert "No module named 'experiments'" in r.stderr
