"""SPICE benchmark (issue #6): the packed memory-mapped store (equal to the in-memory reader, reused, rebuilt
when the source or the filter changes, clear errors), streamed batches equal in-memory batches, the command on
the bundled sample with every model, the multi-molecule rMD17-in-SPICE-layout file split by molecule, the Zenodo
download path (offline), and data-parallel training on two CPU devices equal to one device."""

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import SPICE_SAMPLE, data
from test_experiments import _RangeHandler, server  # noqa: F401  (fixture)

import so3lib.data as d
from so3lib.data.spice import filter_spice
from so3lib.data.store import convert_spice, open_store
from so3lib.graph.batching import GraphLoader

ROOT = Path(__file__).parents[1]
TINY = {
    "schnet": ["--n-atom-basis", "8", "--n-interactions", "1"],
    "so3krates": ["--features", "8", "--l-max", "1", "--layers", "1", "--heads", "2"],
    "bpnn": ["--n-radial", "4", "--n-angular", "2"],
}


@pytest.fixture(scope="session")  # session: built once per worker, whatever the order
def spice_like(tmp_path_factory):
    spec = importlib.util.spec_from_file_location("msl", ROOT / "scripts" / "make_spice_like.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.write_spice_like(data("rmd17"), tmp_path_factory.mktemp("sl") / "rmd17_spice.hdf5", frames=20)


def test_store_equals_reader_and_streams_the_same_batches(spice_like, tmp_path):
    store = convert_spice(spice_like, tmp_path / "store", progress=False)
    view = open_store(store)
    ref, rep = filter_spice(spice_like)
    assert len(view) == len(ref) == 200 and isinstance(view.base.positions, np.memmap)
    pick = np.array([7, 3, 150, 199])
    got, want = view.materialize(pick), ref.subset(pick)
    for k in ("numbers", "positions", "forces", "energy", "offsets"):
        np.testing.assert_array_equal(getattr(got, k), getattr(want, k))
    assert list(got.meta["name"]) == list(want.meta["name"]) and list(got.meta["frame"]) == list(want.meta["frame"])
    # the energy reference from the stored compositions equals the one from the atoms
    a, b = d.fit_energy_reference(view), d.fit_energy_reference(ref)
    np.testing.assert_allclose(a.energies_ev, b.energies_ev, rtol=1e-10)
    np.testing.assert_allclose(a.energy(view), b.energy(ref), rtol=1e-12)
    # streamed batches (read from disk, neighbour lists in worker threads) equal the in-memory ones
    streamed = GraphLoader(view, 4.0, 16, seed=3, device_put=False)
    memory = GraphLoader(ref, 4.0, 16, seed=3, device_put=False, ladder=streamed.ladder)
    n = 0
    for ga, gb in zip(streamed.epoch(1), memory.epoch(1)):
        for x, y in zip(jax.tree_util.tree_leaves(ga), jax.tree_util.tree_leaves(gb)):
            np.testing.assert_array_equal(x, y)
        n += 1
    assert n == len(streamed) == 13


def test_store_is_reused_and_invalidated(spice_like, tmp_path):
    src = tmp_path / "s.hdf5"
    src.write_bytes(spice_like.read_bytes())
    store = tmp_path / "store"
    convert_spice(src, store, progress=False)
    stamp = (store / "positions.bin").stat().st_mtime_ns
    convert_spice(src, store, progress=False)  # same source and filters: reused
    assert (store / "positions.bin").stat().st_mtime_ns == stamp
    fmax = np.abs(filter_spice(src)[0].forces).max()
    convert_spice(src, store, max_force_ev_per_a=0.5 * fmax, progress=False)  # filter changed: rebuilt
    m = json.loads((store / "manifest.json").read_text())
    assert 0 < m["report"]["dropped"]["max_force"]["conformers"] and m["frames"] < 200
    assert len(open_store(store)) == m["frames"]
    os.utime(src, ns=(stamp, stamp + 10**9))  # source changed: rebuilt
    convert_spice(src, store, progress=False)
    assert json.loads((store / "manifest.json").read_text())["frames"] == 200


def test_store_errors_name_the_file(tmp_path):
    sample = SPICE_SAMPLE
    with pytest.raises(d.DataError, match="no conformation survives the filters"):
        convert_spice(sample, tmp_path / "s", progress=False)  # both sample molecules are charged
    store = convert_spice(sample, tmp_path / "s", neutral_only=False, progress=False)
    with open(store / "forces.bin", "r+b") as fh:
        fh.truncate(100)
    with pytest.raises(d.DataError, match=r"forces.bin.*truncated"):
        open_store(store)


@pytest.mark.parametrize(
    "model", ["schnet", pytest.param("so3krates", marks=pytest.mark.slow), pytest.param("bpnn", marks=pytest.mark.slow)]
)
def test_spice_command_on_the_bundled_sample(model, tmp_path, monkeypatch):
    from so3lib.cli import invoke

    monkeypatch.chdir(tmp_path)
    res = invoke(
        [
            "spice",
            "--model",
            model,
            *TINY[model],
            "--max-steps",
            "2",
            "--eval-every-steps",
            "2",
            "--batch-size",
            "4",
            "--out",
            str(tmp_path / "run"),
            "--no-progress",
        ]
    )
    s = res["spice"]
    assert s["bundled_sample"] and not s["filters"]["neutral_only"]
    assert s["dropped"]["element"]["names"] == ["C#C.[Na+]"] and s["dropped"]["element"]["conformers"] == 5
    assert s["counts"]["conformations_kept"] == 50 and s["split"].startswith("by conformation")
    assert s["counts"]["train"] + s["counts"]["val"] + s["counts"]["test"] == 50
    rows = {r["subset"]: r for r in s["test_by_subset"]}
    assert rows["all"]["conformations"] == s["counts"]["test"] == 10
    np.testing.assert_allclose(rows["all"]["forces_mae_mev_per_a"], 1e3 * res["test"]["forces_mae_ev_per_a"], rtol=1e-4)
    assert np.isfinite(rows["all"]["energy_mae_mev_per_atom"])
    assert res["streamed"] and (tmp_path / "data" / "stores" / "SPICE-1.1.4_n2" / "manifest.json").exists()
    assert "meV/atom" in (tmp_path / "run" / "results.md").read_text()


def test_spice_command_splits_by_molecule(spice_like, tmp_path):
    from so3lib.cli import invoke

    res = invoke(
        [
            "spice",
            "--data",
            str(spice_like),
            *TINY["schnet"],
            "--max-steps",
            "6",
            "--batch-size",
            "8",
            "--val-fraction",
            "0.2",
            "--test-fraction",
            "0.2",
            "--store",
            str(tmp_path / "store"),
            "--out",
            str(tmp_path / "run"),
            "--no-progress",
        ]
    )
    s = res["spice"]
    assert s["split"].startswith("by molecule") and s["filters"]["neutral_only"]
    view = open_store(tmp_path / "store")
    splits = d.load_splits(tmp_path / "run" / "splits.npz")
    names = {k: set(view.meta["name"][v]) for k, v in splits.items()}
    assert len(names["train"]) == 6 and len(names["val"]) == 2 and len(names["test"]) == 2
    assert not (names["train"] & names["test"]) and not (names["train"] & names["val"])
    assert not (names["val"] & names["test"])
    assert (
        s["counts"]["test"] == 40
        and s["energy_reference"]["residual_std_per_atom_mev"] < s["energy_reference"]["raw_std_per_atom_mev"]
    )


@pytest.mark.slow  # 17 s; resume and md5 of the download helper are tested by default (test_experiments)
def test_spice_download_option_offline(tmp_path, server, monkeypatch):  # noqa: F811
    """--download fetches from the (here: local) address, resumes a partial file, checks the md5, then runs."""
    from so3lib.cli import invoke
    from so3lib.data.download import SPICE, Remote

    payload = SPICE_SAMPLE.read_bytes()
    _RangeHandler.payload = payload
    fake = Remote("SPICE-1.1.4.hdf5", (f"{server}/file",), md5=hashlib.md5(payload).hexdigest())
    monkeypatch.setitem(SPICE, "1.1.4", fake)
    (tmp_path / "dl").mkdir()
    (tmp_path / "dl" / "SPICE-1.1.4.hdf5.part").write_bytes(payload[:5000])
    res = invoke(
        [
            "spice",
            "--download",
            "1.1.4",
            "--download-dir",
            str(tmp_path / "dl"),
            "--keep-charged",
            "--e0s",
            "average",  # the sample's one charged molecule: least squares cannot fix e_Z
            "--store",
            str(tmp_path / "st"),
            *TINY["schnet"],
            "--max-steps",
            "1",
            "--batch-size",
            "4",
            "--out",
            str(tmp_path / "run"),
            "--no-progress",
        ]
    )
    assert (tmp_path / "dl" / "SPICE-1.1.4.hdf5").read_bytes() == payload
    assert res["spice"]["counts"]["conformations_kept"] == 50 and not res["spice"]["bundled_sample"]


DP_SCRIPT = r"""
import os, sys
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
import jax
jax.config.update("jax_enable_x64", True)
import numpy as np
import so3lib.data as d
from so3lib.data.store import convert_spice, open_store
from so3lib.models import make_config
from so3lib.training import RunConfig, train
from so3lib.training.optim import make_optimizer
from so3lib.training.trainer import build_potential, data_mesh, init_state, make_loader, make_train_step
from jax.sharding import NamedSharding, PartitionSpec
assert len(jax.devices()) == 2, jax.devices()
view = open_store(convert_spice(sys.argv[1], sys.argv[2] + "/store", progress=False))
cfg = RunConfig(model=make_config("schnet", n_atom_basis=8, n_interactions=2, dtype="float64"),
                training={"batch_size": 8, "max_steps": 1})
pot = build_potential(cfg, view)
mesh = data_mesh(2)
one, two = make_loader(view, pot, 8, True, 0, "t"), make_loader(view, pot, 8, True, 0, "t", mesh)
g1, g2 = next(one.epoch(0)), next(two.epoch(0))
assert g2.senders.shape[0] == 2 and len(g2.senders.sharding.device_set) == 2
params = pot.init(jax.random.PRNGKey(0), g1)
opt = make_optimizer(cfg.training, 10)
host = jax.tree_util.tree_map(np.array, params)
s1 = init_state(jax.tree_util.tree_map(np.array, host), opt.init(params))
s2 = jax.device_put(init_state(jax.tree_util.tree_map(np.array, host), opt.init(params)),
                    NamedSharding(mesh, PartitionSpec()))
s1, l1, _ = make_train_step(pot, opt, 0.99)(s1, g1)
s2, l2, _ = make_train_step(pot, opt, 0.99, sharded=True)(s2, g2)
assert abs(float(l1) - float(l2)) <= 1e-12 * abs(float(l1)), (float(l1), float(l2))
diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
           for a, b in zip(jax.tree_util.tree_leaves(s1), jax.tree_util.tree_leaves(s2)))
assert diff < 1e-10, diff
assert len(jax.tree_util.tree_leaves(s2["params"])[0].sharding.device_set) == 2
tr = view.subset(np.arange(0, 200, 2)); va = view.subset(np.arange(1, 40, 2))
res = train(RunConfig(model=make_config("schnet", n_atom_basis=8, n_interactions=1),
                      training={"batch_size": 8, "max_steps": 6, "eval_every_steps": 3, "n_devices": 2}),
            tr, va, None, out_dir=sys.argv[2] + "/run", progress=False)
assert res["n_devices"] == 2 and res["n_compiles_train_step"] == len(res["padded_shapes_train"])
assert np.isfinite(res["val"]["forces_mae_ev_per_a"])
print("OK", float(l1), float(l2), diff)
"""


@pytest.mark.slow  # the default tier stays under 8 minutes on 2 cores
def test_two_device_step_equals_one_device(spice_like, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    r = subprocess.run(
        [sys.executable, "-c", DP_SCRIPT, str(spice_like), str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout[-2000:] + r.stderr[-4000:]
