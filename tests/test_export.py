"""Exported models (issue #16 item 6): `so3lib export` writes a jax.export artifact that a script using jax alone
(so3lib, flax, e3nn-jax and jraph unimportable) evaluates to the calculator's energy, forces and stress, for
SchNet on rMD17 ethanol and SO3krates on periodic Li cells; padding contributes nothing; the per-atom program is
differentiable after loading; bad input is one line."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import ase.io
import numpy as np
import pytest
from conftest import ETHANOL_TEST, ROOT, data

import so3lib.data as d
from so3lib.cli import main
from so3lib.models import make_config
from so3lib.training import DataConfig, RunConfig, train

POISON = ("so3lib", "flax", "e3nn_jax", "jraph")


def _tiny_run(out: Path, ds, model) -> Path:
    cfg = RunConfig(
        model=model,
        training={"batch_size": 4, "max_epochs": None, "max_steps": 2, "eval_every_steps": 2},
        data=DataConfig(energy_reference="average"),
    )
    train(cfg, ds.subset(np.arange(12)), ds.subset(np.arange(12, 16)), None, out_dir=out, progress=False)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{name: (run folder, export folder, structures file)}: SchNet on ethanol, SO3krates on periodic Li."""
    tmp = tmp_path_factory.mktemp("export")
    eth, li = d.read(ETHANOL_TEST), d.read(data("materials", "li_mlearn_test.json"))
    out = {}
    for name, ds, model in (
        ("schnet", eth, make_config("schnet", n_atom_basis=8, n_interactions=2)),
        ("so3krates", li, make_config("so3krates", features=8, layers=1, heads=2, l_max=2, cutoff=4.0)),
    ):
        run = _tiny_run(tmp / f"run_{name}", ds, model)
        assert main(["export", str(run), "--out", str(tmp / f"exp_{name}")]) == 0
        frames = tmp / f"{name}.extxyz"
        ase.io.write(frames, [ds[i].to_ase() for i in (0, 5, 11)], format="extxyz")
        out[name] = (run, tmp / f"exp_{name}", frames)
    return out


def loader_source() -> str:
    """The standalone loader exactly as docs/export.md shows it."""
    text = (ROOT / "docs" / "export.md").read_text()
    return re.search(r"<!-- loader -->\n```python\n(.*?)```", text, re.S).group(1)


@pytest.mark.parametrize("name", ["schnet", "so3krates"])
def test_standalone_loader_equals_the_calculator(runs, name, tmp_path):
    from ase.stress import voigt_6_to_full_3x3_stress

    from so3lib.calculator import load_calculator

    run, exp, frames = runs[name]
    script = tmp_path / "load_export.py"
    script.write_text(loader_source())
    guard = (  # isolated interpreter in which so3lib and the model libraries cannot be imported
        f"import runpy, sys; sys.modules.update(dict.fromkeys({POISON!r})); "
        f"sys.argv = [{str(script)!r}, {str(exp)!r}, {str(frames)!r}]; runpy.run_path(sys.argv[0], run_name='__main__')"
    )
    p = subprocess.run([sys.executable, "-I", "-c", guard], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    got = [json.loads(line) for line in p.stdout.splitlines()]
    calc = load_calculator(run)
    atoms_list = ase.io.read(frames, ":")
    assert len(got) == len(atoms_list) == 3
    for atoms, g in zip(atoms_list, got):
        periodic = bool(atoms.pbc.any())
        calc.calculate(atoms, ["energy", "forces"] + (["stress"] if periodic else []))
        assert g["energy_ev"] == pytest.approx(calc.results["energy"], abs=2e-5)
        np.testing.assert_allclose(g["forces_ev_per_a"], calc.results["forces"], atol=2e-5, rtol=0)
        assert np.ptp(calc.results["forces"]) > 1e-3  # the forces are not trivially zero
        if periodic:
            ref = voigt_6_to_full_3x3_stress(calc.results["stress"])
            np.testing.assert_allclose(g["stress_ev_per_a3"], ref, atol=1e-7, rtol=0)
            assert np.abs(ref).max() > 1e-6
        else:
            assert g["stress_ev_per_a3"] is None  # a molecule has no stress, never a fake 0


def _inputs(atoms, meta):
    from vesin import NeighborList

    box = atoms.cell.array if atoms.pbc.any() else np.zeros((3, 3))
    nl = NeighborList(cutoff=meta["cutoff_angstrom"], full_list=True)
    i, j, S = nl.compute(atoms.positions, box, atoms.pbc.tolist() if atoms.pbc.any() else False, quantities="ijS")
    dt = np.dtype(meta["dtype"])
    return [
        np.asarray(atoms.positions, dt),
        np.asarray(atoms.numbers, np.int32),
        np.asarray(atoms.cell.array, dt),
        np.asarray(atoms.pbc),
        np.asarray(j, np.int32),
        np.asarray(i, np.int32),
        np.asarray(S, np.int32),
    ]


def test_padding_and_the_differentiable_atomic_energies(runs):
    """Padding atoms (species 0) and edges after the real ones change nothing; Σ atomic energies = E and
    −∂/∂r of it (through the VJP serialized with the program) = the forces."""
    import jax

    from so3lib.potential_export import load_export

    _, exp, frames = runs["so3krates"]
    meta, prog = load_export(exp)
    atoms = ase.io.read(frames, 1)
    x = _inputs(atoms, meta)
    e, f, s = prog["potential"].call(*x)
    n, pad_atoms, pad_edges = len(atoms), 3, 7
    xp = list(x)
    xp[0] = np.concatenate([x[0], np.full((pad_atoms, 3), 0.3, x[0].dtype)])
    xp[1] = np.concatenate([x[1], np.zeros(pad_atoms, np.int32)])
    xp[4] = np.concatenate([x[4], np.full(pad_edges, n, np.int32)])
    xp[5] = np.concatenate([x[5], np.full(pad_edges, n + 1, np.int32)])
    xp[6] = np.concatenate([x[6], np.zeros((pad_edges, 3), np.int32)])
    ep, fp, sp = prog["potential"].call(*xp)
    assert float(ep) == pytest.approx(float(e), abs=1e-5)
    np.testing.assert_allclose(np.asarray(fp)[:n], f, atol=1e-6)
    assert np.all(np.asarray(fp)[n:] == 0)
    np.testing.assert_allclose(sp, s, atol=1e-8)
    atomic = prog["atomic_energies"]
    args = [x[0], x[1], x[2], *x[4:]]
    assert float(np.sum(np.asarray(atomic.call(*args), np.float64))) == pytest.approx(float(e), abs=1e-3)
    grad = jax.grad(lambda p: atomic.call(p, *args[1:]).sum())(x[0])
    np.testing.assert_allclose(-np.asarray(grad), f, atol=1e-5)


def test_export_json_describes_the_artifact(runs):
    from so3lib.potential_export import load_export

    _, exp, _ = runs["schnet"]
    meta, prog = load_export(exp)
    assert meta["format"] == "so3lib-jax-export" and meta["so3lib_version"] and meta["jax_version"]
    assert meta["cutoff_angstrom"] == 5.0 and meta["species"] == [1, 6, 8] and meta["elements"] == ["H", "C", "O"]
    assert meta["model"]["family"] == "schnet" and meta["model"]["hyperparameters"]["n_interactions"] == 2
    assert meta["message_passing_hops"] == 2 and meta["dtype"] == "float32"
    pins = {r["name"]: r for r in meta["programs"]["potential"]["inputs"]}
    assert pins["positions"] == {**pins["positions"], "shape": ["n_atoms", 3], "units": "Å", "dtype": "float32"}
    outs = {r["name"]: (r["units"], r["dtype"]) for r in meta["programs"]["potential"]["outputs"]}
    assert outs == {"energy": ("eV", "float64"), "forces": ("eV/Å", "float32"), "stress": ("eV/Å³", "float32")}
    # lowered for cuda on a machine without a GPU, next to cpu; symbolic sizes
    assert meta["platforms"] == ["cpu", "cuda"] and tuple(prog["potential"].platforms) == ("cpu", "cuda")
    assert str(prog["potential"].in_avals[0].shape) == "(n_atoms, 3)"


def _error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("so3lib: error: "), err
    return err[0]


def test_bad_input_is_one_line_and_nothing_foreign_is_overwritten(runs, tmp_path, capsys):
    run, exp, frames = runs["schnet"]
    assert "nothing: no such run folder" in _error(capsys, ["export", str(tmp_path / "nothing"), "--out", "x"])
    msg = _error(capsys, ["export", str(tmp_path), "--out", str(tmp_path / "x")])
    assert "potential.yaml missing: is" in msg and "a finished so3lib run?" in msg
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    msg = _error(capsys, ["export", str(run), "--out", str(foreign)])
    assert msg.endswith("mine: exists and was not written by so3lib export; choose another --out")
    assert (
        sorted(p.name for p in foreign.iterdir()) == ["notes.txt"] and (foreign / "notes.txt").read_text() == "keep me"
    )
    assert "exists and is not a folder" in _error(capsys, ["export", str(run), "--out", str(frames)])
    assert "unknown platform(s) ['tpu9']" in _error(capsys, ["export", str(run), "--out", "x", "--platforms", "tpu9"])
    # its own folder is refreshed in place
    assert main(["export", str(run), "--out", str(exp), "--platforms", "cpu"]) == 0
    assert json.loads((exp / "export.json").read_text())["platforms"] == ["cpu"]


def test_an_angular_bpnn_is_refused_with_the_reason():
    from so3lib.data.reference import EnergyReference
    from so3lib.potential import Potential
    from so3lib.potential_export import export_potential

    pot = Potential(make_config("bpnn"), EnergyReference(species=(1, 8), energies_ev=(-13.6, -2040.0)))
    with pytest.raises(
        ValueError, match=r"model bpnn with angular symmetry functions needs triplets built on the host"
    ):
        export_potential(pot, {})
