"""Label keys (MACE-style REF_energy / REF_forces) reach the readers, missing labels fail loudly, and the
per-element energy reference says when the training compositions do not determine it (rank check), with the
'average' and isolated-atom alternatives."""

import logging

import ase
import ase.io
import numpy as np
import pytest
from conftest import ETHANOL_TRAIN, SPICE_SAMPLE, data

import so3lib.data as d
from so3lib import units
from so3lib.data.reference import composition_matrix
from so3lib.training import DataConfig

UNDETERMINED_ETHANOL = (
    "per-element energy reference is not determined: the training set's compositions have rank 1 for 3 elements "
    "(H, C, O) (a single composition: every frame has the same atoms); use energy_reference 'average' or "
    "isolated-atom energies (--e0s average / --e0s FILE), or allow_undetermined=True "
    "(--allow-undetermined-reference) to go on with the minimum-norm solution"
)


@pytest.fixture(scope="module")
def ethanol():
    return d.read(ETHANOL_TRAIN)


def write_mace_extxyz(path, ds, n, drop_energy_in=None, extra_info=None):
    """Frames of ``ds`` as MACE writes them: REF_energy in info, REF_forces in arrays, no calculator."""
    frames = []
    for i in range(n):
        s = ds[i]
        atoms = ase.Atoms(numbers=s.numbers, positions=s.positions)
        if i != drop_energy_in:
            atoms.info["REF_energy"] = s.energy
        atoms.info["config_type"] = "ethanol"
        atoms.info.update(extra_info or {})
        atoms.arrays["REF_forces"] = s.forces.copy()
        frames.append(atoms)
    ase.io.write(path, frames, format="extxyz")
    return path


# ---------------------------------------------------------------------------------------------- label keys
def test_mace_extxyz_read_with_keys_equals_the_npz_labels(tmp_path, ethanol):
    p = write_mace_extxyz(tmp_path / "mace.extxyz", ethanol, 5)
    ds = d.read(p, energy_key="REF_energy", forces_key="REF_forces")
    assert len(ds) == 5 and d.detect_format(p) == "ase"
    np.testing.assert_array_equal(ds.energy, ethanol.energy[:5])  # eV, written at full precision
    np.testing.assert_array_equal(ds.numbers, ethanol.numbers[:45])
    # extxyz writes per-atom floats with 8 decimals: equal to the last written digit
    assert np.abs(ds.forces - ethanol.forces[:45]).max() <= 5e-9
    assert np.abs(ds.positions - ethanol.positions[:45]).max() <= 5e-9
    assert ds.stress is None


def test_mace_extxyz_without_keys_fails_loudly(tmp_path, ethanol):
    p = write_mace_extxyz(tmp_path / "mace.extxyz", ethanol, 3)
    with pytest.raises(d.DataError) as exc:
        d.read(p)
    assert str(exc.value) == (
        f"{p}, key 'energy': no energy label and no forces label found under the default keys (calculator "
        "'energy', info 'energy'; calculator 'forces', arrays 'forces'/'force') in any frame, but the frames have "
        "info keys ['REF_energy', 'config_type'] and arrays keys ['REF_forces', 'numbers', 'positions']: name the "
        "labels with --energy-key NAME / --forces-key NAME (energy_key=NAME / forces_key=NAME in so3lib.data.read)"
    )
    # the energy key alone: the forces are still under a name the defaults do not know
    with pytest.raises(d.DataError, match=r"key 'forces': no forces label found under the default keys .*'REF_forces'"):
        d.read(p, energy_key="REF_energy")


def test_explicit_key_missing_in_a_frame_names_the_frame_and_its_keys(tmp_path, ethanol):
    p = write_mace_extxyz(tmp_path / "gap.extxyz", ethanol, 4, drop_energy_in=2)
    with pytest.raises(d.DataError) as exc:
        d.read(p, energy_key="REF_energy", forces_key="REF_forces")
    assert str(exc.value) == (
        f"{p}, key 'REF_energy', frame 2: no energy label 'REF_energy' in this frame (info keys ['config_type'], "
        "arrays keys ['REF_forces', 'numbers', 'positions'])"
    )
    assert exc.value.key == "REF_energy" and exc.value.frame == 2
    with pytest.raises(d.DataError, match=r"key 'DFT_forces', frame 0: no forces label 'DFT_forces' in this frame"):
        d.read(p, energy_key="REF_energy", forces_key="DFT_forces")
    with pytest.raises(d.DataError, match=r"key 'REF_stress', frame 0: no stress label 'REF_stress'"):
        d.read(p, forces_key="REF_forces", stress_key="REF_stress")


def test_validation_errors_name_the_label_key(tmp_path, ethanol):
    p = write_mace_extxyz(tmp_path / "nan.extxyz", ethanol, 3)
    frames = ase.io.read(p, index=":")
    frames[1].arrays["REF_forces"][4, 2] = np.nan
    ase.io.write(p, frames, format="extxyz")
    with pytest.raises(d.DataError) as exc:
        d.read(p, energy_key="REF_energy", forces_key="REF_forces")
    assert str(exc.value) == f"{p}, key 'REF_forces', frame 1: NaN or infinite value"


def test_plain_structure_files_still_load_unlabelled(tmp_path, ethanol):
    p = tmp_path / "plain.xyz"
    ase.io.write(p, [ase.Atoms(numbers=s.numbers, positions=s.positions) for s in ethanol.subset([0, 1])])
    ds = d.read(p)
    assert len(ds) == 2 and np.isnan(ds.energy).all() and ds.forces is None


def test_stress_key_voigt_and_default_keys_unchanged(tmp_path):
    cell = np.eye(3) * 3.0
    voigt = np.array([0.01, 0.02, 0.03, 0.004, 0.005, 0.006])  # xx yy zz yz xz xy
    frames = []
    for k in range(2):
        a = ase.Atoms("Li2", positions=[[0, 0, 0], [1.5, 1.5, 1.5 + 0.1 * k]], cell=cell, pbc=True)
        a.info.update(REF_energy=-3.0 - k, REF_stress=voigt * (k + 1))
        a.arrays["REF_forces"] = np.full((2, 3), 0.1 * k)
        frames.append(a)
    p = tmp_path / "li.extxyz"
    ase.io.write(p, frames, format="extxyz")
    ds = d.read(p, energy_key="REF_energy", forces_key="REF_forces", stress_key="REF_stress")
    np.testing.assert_array_equal(ds.energy, [-3.0, -4.0])
    xx, yy, zz, yz, xz, xy = voigt * 2
    np.testing.assert_allclose(ds.stress[1], [[xx, xy, xz], [xy, yy, yz], [xz, yz, zz]], rtol=0, atol=1e-12)
    np.testing.assert_allclose(ds.forces[2:], 0.1, rtol=0, atol=1e-12)
    # the committed TiAl slice (calculator energy, arrays 'force', info 'virial') reads the same with its keys named
    tial = data("materials", "tial_first40.xyz")
    a, b = d.read(tial), d.read(tial, energy_key="energy", forces_key="force", stress_key="virial")
    for k in ("energy", "forces", "stress"):
        np.testing.assert_array_equal(getattr(a, k), getattr(b, k))
    assert np.isfinite(a.stress).all() and np.isfinite(a.energy).all()


def test_npz_label_keys(tmp_path, ethanol):
    raw = np.load(ETHANOL_TRAIN)
    p = tmp_path / "rmd17_ethanol_relabelled.npz"
    np.savez(
        p,
        nuclear_charges=raw["nuclear_charges"],
        coords=raw["coords"][:10],
        ccsd_energies=raw["energies"][:10] + 1.0,
        ccsd_forces=raw["forces"][:10] * 2.0,
    )
    ds = d.read(p, energy_key="ccsd_energies", forces_key="ccsd_forces")
    np.testing.assert_array_equal(ds.energy, (raw["energies"][:10] + 1.0) * units.KCAL_PER_MOL_EV)  # kcal/mol
    np.testing.assert_array_equal(ds.forces, (raw["forces"][:10] * 2.0).reshape(-1, 3) * units.KCAL_PER_MOL_EV)
    with pytest.raises(d.DataError) as exc:
        d.read(p, energy_key="dft_energies", forces_key="ccsd_forces")
    assert str(exc.value) == (
        f"{p}, key 'dft_energies': missing key given as energy_key "
        "(file has ['ccsd_energies', 'ccsd_forces', 'coords', 'nuclear_charges'])"
    )
    with pytest.raises(d.DataError, match=r"key 'energies': missing key .*name the energy array with energy_key=NAME"):
        d.read(p)
    with pytest.raises(d.DataError, match="rmd17 files carry no stress labels"):
        d.read(p, energy_key="ccsd_energies", forces_key="ccsd_forces", stress_key="stress")
    # sGDML layout: E/F replaced; without keys, energy-like arrays are an error, not unlabelled frames
    q = tmp_path / "sgdml.npz"
    np.savez(q, z=raw["nuclear_charges"], R=raw["coords"][:4], REF_E=raw["energies"][:4], REF_F=raw["forces"][:4])
    s = d.read(q, energy_key="REF_E", forces_key="REF_F")
    np.testing.assert_array_equal(s.energy, ethanol.energy[:4])
    np.testing.assert_array_equal(s.forces, ethanol.forces[:36])
    np.savez(q, z=raw["nuclear_charges"], R=raw["coords"][:4], energy_ccsd=raw["energies"][:4])
    with pytest.raises(d.DataError) as exc:
        d.read(q)
    assert str(exc.value) == (
        f"{q}, key 'E': no energy label under the default key 'E', but the file has keys ['R', 'energy_ccsd', 'z']; "
        "name the label with energy_key=NAME (--energy-key NAME)"
    )


def test_spice_and_mlearn_label_keys(tmp_path):
    import h5py

    ref = d.read(SPICE_SAMPLE)
    p = tmp_path / "spice_forces.hdf5"
    with h5py.File(SPICE_SAMPLE) as src, h5py.File(p, "w") as dst:
        for name in src:
            g = dst.create_group(name)
            for k in ("atomic_numbers", "conformations", "smiles"):
                src.copy(src[name][k], g, k)
            g["my_energy"] = src[name]["dft_total_energy"][()]
            g["my_forces"] = -src[name]["dft_total_gradient"][()]  # forces, not a gradient
            g["my_gradient"] = src[name]["dft_total_gradient"][()]
    a = d.read(p, energy_key="my_energy", forces_key="my_forces")
    b = d.read(p, energy_key="my_energy", forces_key="my_gradient")
    np.testing.assert_array_equal(a.energy, ref.energy)
    np.testing.assert_array_equal(a.forces, ref.forces)
    np.testing.assert_array_equal(b.forces, ref.forces)
    name = next(iter(h5py.File(p)))
    with pytest.raises(d.DataError) as exc:
        d.read(p, forces_key="my_forces")
    assert str(exc.value) == (
        f"{p}, key '{name}/dft_total_energy': group '{name}' lacks ['dft_total_energy'] (it has "
        "['atomic_numbers', 'conformations', 'my_energy', 'my_forces', 'my_gradient', 'smiles'])"
    )
    li = data("materials", "li_mlearn_test.json")
    with pytest.raises(d.DataError) as exc:
        d.read(li, energy_key="REF_energy")
    assert str(exc.value) == (
        f"{li}, key 'REF_energy': mlearn files have fixed label keys outputs.energy, outputs.forces and "
        "outputs.virial_stress: energy_key, forces_key and stress_key cannot be given"
    )
    np.testing.assert_array_equal(d.read(li, energy_key="outputs.energy").energy, d.read(li).energy)


# ---------------------------------------------------------------------------------------------- reference
def test_single_composition_lstsq_is_undetermined(ethanol):
    with pytest.raises(d.UndeterminedReferenceError) as exc:
        d.fit_energy_reference(ethanol)
    assert isinstance(exc.value, d.DataError)
    assert str(exc.value) == f"{ETHANOL_TRAIN}, key 'energy': {UNDETERMINED_ETHANOL}"
    with pytest.raises(d.UndeterminedReferenceError) as exc:
        d.fit_energy_reference(ethanol, intercept=True)
    assert "have rank 1 for 3 elements (H, C, O) and an intercept (a single composition" in str(exc.value)


def test_allow_undetermined_warns_and_gives_the_minimum_norm_solution(ethanol, caplog):
    with caplog.at_level(logging.WARNING, logger="so3lib.data"):
        ref = d.fit_energy_reference(ethanol, allow_undetermined=True)
    [rec] = [r for r in caplog.records if r.name == "so3lib.data"]
    assert rec.levelno == logging.WARNING
    assert rec.getMessage().startswith(
        f"{ETHANOL_TRAIN}: per-element energy reference is not determined: the training set's compositions have "
        "rank 1 for 3 elements (H, C, O) (a single composition: every frame has the same atoms); going on with "
        "the minimum-norm solution"
    )
    assert ref.determined is False and ref.method == "lstsq"
    counts = np.array([6.0, 2.0, 1.0])  # C2H6O in species order (H, C, O)
    e = np.array(ref.energies_ev)
    # minimum norm: e ∥ counts, and the reference energy is the mean energy
    np.testing.assert_allclose(e, counts * (ethanol.energy.mean() / (counts @ counts)), rtol=1e-12)
    np.testing.assert_allclose(ref.energy(ethanol), ethanol.energy.mean(), rtol=1e-13)
    back = d.EnergyReference.from_dict(ref.to_dict())
    assert back == ref and back.determined is False
    old = {k: v for k, v in ref.to_dict().items() if k != "determined"}  # written before the field existed
    assert d.EnergyReference.from_dict(old).determined is True


def test_average_reference(ethanol):
    ref = d.fit_energy_reference(ethanol, method="average")
    per_atom = np.mean(ethanol.energy / 9)
    assert ref.method == "average" and ref.determined is True and ref.intercept_ev == 0.0
    assert ref.species == (1, 6, 8) and ref.energies_ev == (per_atom,) * 3
    np.testing.assert_allclose(ref.energy(ethanol), 9 * per_atom, rtol=0, atol=0)
    # a single molecule: the same reference energy as the minimum-norm least squares
    np.testing.assert_allclose(ref.energy(ethanol), ethanol.energy.mean(), rtol=1e-13)
    mixed = multi_molecule()
    ref = d.fit_energy_reference(mixed, method="average")
    np.testing.assert_allclose(ref.energy(mixed), mixed.n_atoms * np.mean(mixed.energy / mixed.n_atoms), rtol=1e-14)
    assert d.EnergyReference.from_dict(ref.to_dict()) == ref
    with pytest.raises(ValueError, match="intercept=True contradicts method 'average'"):
        d.fit_energy_reference(ethanol, intercept=True, method="average")
    with pytest.raises(ValueError, match="unknown energy reference method 'mean'"):
        d.fit_energy_reference(ethanol, method="mean")


def test_fixed_ratio_compositions_are_caught():
    # H2O and H4O2 (one molecule, doubled): two compositions, but H and O always 2:1
    frames = []
    for k in (1, 2):
        atoms = ase.Atoms("H2O" * k, positions=[[3.0 * i, 0.4 * (i % 3), 0.0] for i in range(3 * k)])
        frames.append(d.Structure.from_ase(atoms))
    ds = d.Dataset.from_structures(frames, source="water.xyz")
    ds.energy = np.array([-14.0, -28.5])
    with pytest.raises(d.UndeterminedReferenceError) as exc:
        d.fit_energy_reference(ds)
    assert str(exc.value).startswith(
        "water.xyz, key 'energy': per-element energy reference is not determined: the training set's compositions "
        "have rank 1 for 2 elements (H, O) (2 distinct compositions); use energy_reference 'average'"
    )
    # with an intercept: rank 2 for 3 unknowns
    with pytest.raises(d.UndeterminedReferenceError, match=r"rank 2 for 2 elements \(H, O\) and an intercept"):
        d.fit_energy_reference(ds, method="lstsq+intercept")


def multi_molecule():
    parts = [
        d.read(data("rmd17", f"rmd17_{m}_train_01.npz")).subset(np.arange(20))
        for m in ("ethanol", "aspirin", "uracil", "benzene", "malonaldehyde", "naphthalene")
    ]
    return d.Dataset.concatenate(parts)


def test_determined_multi_molecule_matches_numpy_lstsq():
    ds = multi_molecule()
    ref = d.fit_energy_reference(ds)
    A = composition_matrix(ds, ds.species)
    assert np.linalg.matrix_rank(A) == 4 and ref.species == (1, 6, 7, 8)
    sol, *_ = np.linalg.lstsq(A, ds.energy, rcond=None)
    np.testing.assert_array_equal(ref.energies_ev, sol)
    assert ref.determined is True and ref.method == "lstsq"
    X = np.concatenate([A, np.ones((len(A), 1))], axis=1)
    sol, *_ = np.linalg.lstsq(X, ds.energy, rcond=None)
    ref = d.fit_energy_reference(ds, method="lstsq+intercept")
    np.testing.assert_array_equal(ref.energies_ev + (ref.intercept_ev,), sol)


def test_store_view_rank_check(tmp_path):
    from so3lib.data.store import convert_spice, open_store

    # the bundled SPICE sample with charged molecules kept: one molecule (C, H, N) of 50 conformations is left
    store = convert_spice(SPICE_SAMPLE, tmp_path / "store", neutral_only=False, progress=False)
    view = open_store(store)
    assert len(view) == 50 and set(view.meta["name"]) == {"103147721"}
    with pytest.raises(d.UndeterminedReferenceError) as exc:
        d.fit_energy_reference(view)
    assert str(exc.value) == (
        f"{store}, key 'energy': per-element energy reference is not determined: the training set's compositions "
        "have rank 1 for 3 elements (H, C, N) (a single composition: every frame has the same atoms); use "
        "energy_reference 'average' or isolated-atom energies (--e0s average / --e0s FILE), or "
        "allow_undetermined=True (--allow-undetermined-reference) to go on with the minimum-norm solution"
    )
    ref = d.fit_energy_reference(view, method="average")
    mem = view.materialize()
    np.testing.assert_allclose(ref.energy(view), mem.n_atoms * np.mean(mem.energy / mem.n_atoms), rtol=1e-14)
    np.testing.assert_allclose(ref.energy(view), mem.energy.mean(), rtol=1e-13)


def test_isolated_atom_energies_by_symbol_and_number(tmp_path):
    ds = multi_molecule()
    by_z = d.fit_energy_reference(ds, isolated_atom_energies_ev={1: -13.6, 6: -1029.0, 7: -1484.0, 8: -2041.0})
    by_sym = d.fit_energy_reference(
        ds, isolated_atom_energies_ev={"H": -13.6, "C": -1029.0, "N": -1484.0, "O": -2041.0}
    )
    by_str = d.fit_energy_reference(ds, isolated_atom_energies_ev={"1": -13.6, "6": -1029.0, "7": -1484.0, "8": -2041})
    assert (
        by_z == by_sym == by_str
        and by_z.method == "isolated_atoms"
        and by_z.energies_ev == (-13.6, -1029.0, -1484.0, -2041.0)
    )
    with pytest.raises(d.DataError) as exc:
        d.fit_energy_reference(ds, isolated_atom_energies_ev={"H": -13.6, "C": -1029.0})
    assert str(exc.value) == (
        "<config>, key 'isolated_atom_energies_ev': isolated-atom energies lack elements N, O (atomic numbers [7, 8])"
    )
    f = tmp_path / "e0s.yaml"
    f.write_text("H: -13.6\nC: -1029.0\n7: -1484.0\n'8': -2041\n")
    assert d.load_isolated_atom_energies(f) == {1: -13.6, 6: -1029.0, 7: -1484.0, 8: -2041.0}
    j = tmp_path / "e0s.json"
    j.write_text('{"H": -13.6, "6": -1029.0}')
    assert d.load_isolated_atom_energies(j) == {1: -13.6, 6: -1029.0}
    cfg = DataConfig(energy_reference="isolated_atoms", isolated_atom_energies_ev={"H": -13.6, "O": -2041.0})
    assert cfg.isolated_atom_energies_ev == {1: -13.6, 8: -2041.0} and cfg.train is None


@pytest.mark.parametrize(
    "text, message",
    [
        (
            "H: -13.6\nXx: -1.0\n",
            "key 'Xx': unknown element: expected an element symbol such as 'H' or an atomic number 1-118",
        ),
        ("H: -13.6\n200: -1.0\n", "key '200': unknown element"),
        ("H: -13.6\nC: low\n", "key 'C': isolated-atom energy 'low' is not a number (eV)"),
        ("H: -13.6\nC: .nan\n", "key 'C': isolated-atom energy nan is not a finite number (eV)"),
        ("H: -13.6\n1: -13.5\n", "key '1': element H (atomic number 1) is given twice"),
        (
            "- -13.6\n- -1029.0\n",
            "expected a mapping of element (symbol or atomic number) to isolated-atom energy in eV",
        ),
        ("{}\n", "no isolated-atom energies: the mapping is empty"),
        ("H: [-13.6\n", "not a YAML/JSON mapping of element to energy (ParserError"),
    ],
)
def test_load_isolated_atom_energies_errors(tmp_path, text, message):
    f = tmp_path / "e0s.yaml"
    f.write_text(text)
    with pytest.raises(d.DataError) as exc:
        d.load_isolated_atom_energies(f)
    assert str(exc.value).startswith(f"{f}") and message in str(exc.value)
    with pytest.raises(FileNotFoundError, match="no such isolated-atom energies file"):
        d.load_isolated_atom_energies(tmp_path / "nope.yaml")
