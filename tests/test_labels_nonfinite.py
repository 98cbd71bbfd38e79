"""NaN or infinite labels are errors naming the file, the key and the frame (issue #15, item 2), never "unlabelled";
``nonfinite="drop"`` drops those frames, counted and reported; labels absent from a file still load unlabelled;
SPICE's MACE-OFF filters count non-finite conformers under their own reason; metrics over no label are None and
the plots draw what exists."""

import csv
import json
import logging

import ase
import ase.io
import h5py
import numpy as np
import pytest
from conftest import SPICE_SAMPLE, data

import so3lib.data as d
from so3lib.data.spice import filter_spice
from so3lib.data.store import convert_spice, read_manifest

NAN_MSG = "NaN or infinite value"


# ---------------------------------------------------------------------------------------------- file builders
def rmd17_file(tmp_path, edit=None, name="eth.npz", n=20):
    """The first ``n`` frames of the committed rMD17 slice, with ``edit(arrays)`` applied."""
    raw = np.load(data("rmd17", "rmd17_ethanol_train_01.npz"))
    arrays = {k: raw[k][:n].copy() if k != "nuclear_charges" else raw[k].copy() for k in raw.files}
    if edit:
        edit(arrays)
    np.savez(tmp_path / name, **arrays)
    return tmp_path / name


def sgdml_file(tmp_path, edit=None, name="md17.npz", n=20, drop=()):
    raw = np.load(data("md17", "md17_ethanol_first1050.npz"))
    arrays = {k: raw[k][:n].copy() if k != "z" else raw[k].copy() for k in raw.files if k not in drop}
    if edit:
        edit(arrays)
    np.savez(tmp_path / name, **arrays)
    return tmp_path / name


def mace_extxyz(tmp_path, edit=None, name="mace.extxyz", n=4):
    """MACE-style frames (REF_energy in info, REF_forces in arrays) from rMD17 ethanol; ``edit(frames)``."""
    ds = d.read(data("rmd17", "rmd17_ethanol_train_01.npz"))
    frames = []
    for i in range(n):
        s = ds[i]
        atoms = ase.Atoms(numbers=s.numbers, positions=s.positions)
        atoms.info["REF_energy"] = s.energy
        atoms.arrays["REF_forces"] = s.forces.copy()
        frames.append(atoms)
    if edit:
        edit(frames)
    ase.io.write(tmp_path / name, frames, format="extxyz")
    return tmp_path / name


def periodic_extxyz(tmp_path, edit=None, name="cells.extxyz", n=4):
    """Periodic H2 frames with energy, forces and stress (a calculator's results, as ASE writes them)."""
    from ase.calculators.singlepoint import SinglePointCalculator

    frames = []
    for i in range(n):
        atoms = ase.Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.7 + 0.01 * i]], cell=np.eye(3) * 4.0, pbc=True)
        res = {
            "energy": -1.0 - 0.1 * i,
            "forces": np.array([[0.0, 0.0, 0.1 * i], [0.0, 0.0, -0.1 * i]]),
            "stress": np.array([0.01, 0.02, 0.03, 0.004, 0.005, 0.006]) * (i + 1),
        }
        frames.append((atoms, res))
    if edit:
        edit(frames)
    out = []
    for atoms, res in frames:
        if "virial" in res:
            atoms.info["virial"] = res.pop("virial")
        atoms.calc = SinglePointCalculator(atoms, **res)
        out.append(atoms)
    ase.io.write(tmp_path / name, out, format="extxyz")
    return tmp_path / name


def tiny_spice(tmp_path, edit=None, name="tiny.hdf5", groups=("mol_a", "mol_b"), n=6):
    """SPICE's layout (atomic_numbers, conformations bohr, dft_total_energy hartree, dft_total_gradient
    hartree/bohr, smiles, subset), conformers of the bundled sample's first molecule; ``edit(arrays_by_group)``."""
    with h5py.File(SPICE_SAMPLE) as src:
        g = src["103147721"]
        base = {k: g[k][:n] for k in ("conformations", "dft_total_energy", "dft_total_gradient")}
        base["atomic_numbers"] = g["atomic_numbers"][()]
        smiles, subset = g["smiles"][()], g["subset"][()]
    arrays = {
        grp: {k: np.array(v, dtype=np.float64 if k != "atomic_numbers" else v.dtype) for k, v in base.items()}
        for grp in groups
    }
    if edit:
        edit(arrays)
    with h5py.File(tmp_path / name, "w") as fh:
        for grp, a in arrays.items():
            h = fh.create_group(grp)
            for k, v in a.items():
                h[k] = v
            h["smiles"], h["subset"] = smiles, subset
    return tmp_path / name


def mlearn_file(tmp_path, edit=None, name="li.json", n=5):
    entries = json.load(open(data("materials", "li_mlearn_test.json")))[:n]
    if edit:
        edit(entries)
    (tmp_path / name).write_text(json.dumps(entries))  # json writes NaN / Infinity literally, as Python reads them
    return tmp_path / name


def _set(arrays, key, index, value):
    arrays[key][index] = value


# ---------------------------------------------------------------------------------------------- errors
ERRORS = [  # (case, file builder, read kwargs, key in the message, frame in the message)
    ("rmd17 NaN energy", lambda t: rmd17_file(t, lambda a: _set(a, "energies", 7, np.nan)), {}, "energies", 7),
    ("rmd17 inf force", lambda t: rmd17_file(t, lambda a: _set(a, "forces", (12, 3, 0), -np.inf)), {}, "forces", 12),
    ("rmd17 all-NaN forces frame", lambda t: rmd17_file(t, lambda a: _set(a, "forces", 5, np.nan)), {}, "forces", 5),
    (
        "rmd17 NaN energy, frame index of the file under indices",
        lambda t: rmd17_file(t, lambda a: _set(a, "energies", 9, np.nan)),
        {"indices": [3, 9, 11]},
        "energies",
        9,
    ),
    (
        "rmd17 NaN under an energy_key",
        lambda t: rmd17_file(t, lambda a: _set(a, "old_energies", 4, np.nan)),
        {"energy_key": "old_energies", "forces_key": "old_forces"},
        "old_energies",
        4,
    ),
    ("sgdml inf force", lambda t: sgdml_file(t, lambda a: _set(a, "F", (4, 2, 1), np.inf)), {}, "F", 4),
    ("sgdml NaN energy", lambda t: sgdml_file(t, lambda a: _set(a, "E", (11, 0), np.nan)), {}, "E", 11),
    ("sgdml all-NaN forces frame", lambda t: sgdml_file(t, lambda a: _set(a, "F", 0, np.nan)), {}, "F", 0),
    (
        "extxyz NaN REF_forces component",
        lambda t: mace_extxyz(t, lambda fr: _set(fr[1].arrays, "REF_forces", (4, 2), np.nan)),
        {"energy_key": "REF_energy", "forces_key": "REF_forces"},
        "REF_forces",
        1,
    ),
    (
        "extxyz NaN REF_energy",
        lambda t: mace_extxyz(t, lambda fr: fr[2].info.update(REF_energy=float("nan"))),
        {"energy_key": "REF_energy", "forces_key": "REF_forces"},
        "REF_energy",
        2,
    ),
    (
        "extxyz all-NaN REF_forces frame",
        lambda t: mace_extxyz(t, lambda fr: fr[3].arrays["REF_forces"].fill(np.nan)),
        {"energy_key": "REF_energy", "forces_key": "REF_forces"},
        "REF_forces",
        3,
    ),
    (
        "extxyz NaN stress component",
        lambda t: periodic_extxyz(t, lambda fr: _set(fr[2][1], "stress", 4, np.nan)),
        {},
        "stress",
        2,
    ),
    (
        "extxyz inf virial",
        lambda t: periodic_extxyz(t, _inf_virial_in_frame_1),
        {},
        "virial",
        1,
    ),
    (
        "extxyz NaN energy (calculator)",
        lambda t: periodic_extxyz(t, lambda fr: fr[3][1].update(energy=float("nan"))),
        {},
        "energy",
        3,
    ),
    (
        "SPICE NaN gradient",
        lambda t: tiny_spice(t, lambda a: _set(a["mol_b"], "dft_total_gradient", (3, 5, 1), np.nan)),
        {},
        "mol_b/dft_total_gradient",
        3,
    ),
    (
        "SPICE inf energy",
        lambda t: tiny_spice(t, lambda a: _set(a["mol_a"], "dft_total_energy", 2, np.inf)),
        {},
        "mol_a/dft_total_energy",
        2,
    ),
    (
        "mlearn NaN energy",
        lambda t: mlearn_file(t, lambda e: e[3]["outputs"].update(energy=float("nan"))),
        {},
        "outputs.energy",
        3,
    ),
    (
        "mlearn NaN force component",
        lambda t: mlearn_file(t, lambda e: _set(e[1]["outputs"]["forces"], 0, 2, float("nan"))),
        {},
        "outputs.forces",
        1,
    ),
    (
        "mlearn inf virial_stress",
        lambda t: mlearn_file(t, lambda e: _set(e[4]["outputs"], "virial_stress", 5, float("inf"))),
        {},
        "outputs.virial_stress",
        4,
    ),
]


def _inf_virial_in_frame_1(frames):
    res = frames[1][1]
    del res["stress"]
    res["virial"] = np.diag([0.1, np.inf, 0.2])  # info 'virial': stress = −virial / V


@pytest.mark.parametrize("case,build,kwargs,key,frame", ERRORS, ids=[c[0] for c in ERRORS])
def test_nonfinite_label_is_an_error_naming_file_key_and_frame(tmp_path, case, build, kwargs, key, frame):
    p = build(tmp_path)
    with pytest.raises(d.DataError) as exc:
        d.read(p, **kwargs)
    assert type(exc.value) is d.DataError
    assert str(exc.value) == f"{p}, key '{key}', frame {frame}: {NAN_MSG}"
    assert (exc.value.path, exc.value.key, exc.value.frame) == (str(p), key, frame)


def test_nonfinite_option_is_checked(tmp_path):
    p = rmd17_file(tmp_path)
    with pytest.raises(d.DataError) as exc:
        d.read(p, nonfinite="skip")
    assert str(exc.value) == f"{p}: nonfinite must be one of ('error', 'drop'), got 'skip'"


def test_nan_in_a_structure_is_no_absent_label():
    s = d.Structure(
        numbers=np.array([1, 1]),
        positions=np.array([[0.0, 0, 0], [0, 0, 0.7]]),
        cell=np.zeros((3, 3)),
        pbc=np.zeros(3, bool),
        energy=float("nan"),
    )
    with pytest.raises(d.DataError) as exc:
        d.Dataset.from_structures([s], source="h2.xyz")
    assert str(exc.value) == f"h2.xyz, key 'energy', frame 0: {NAN_MSG}"
    # a Structure without the label (None) is unlabelled
    assert np.isnan(d.Dataset.from_structures([d.Structure.from_ase(s.to_ase())], source="h2.xyz").energy).all()


# ---------------------------------------------------------------------------------------------- drop
DROPS = [  # (case, file builder, read kwargs, frames kept (file indices), expected dropped_nonfinite)
    (
        "rmd17",
        lambda t: rmd17_file(
            t,
            lambda a: (
                _set(a, "energies", 3, np.nan),
                _set(a, "forces", (7, 0, 0), np.inf),
                _set(a, "forces", 9, np.nan),
            ),
        ),
        {},
        [i for i in range(20) if i not in (3, 7, 9)],
        {"count": 3, "frames": [3, 7, 9], "keys": ["energies", "forces", "forces"]},
    ),
    (
        "rmd17 with indices",
        lambda t: rmd17_file(t, lambda a: _set(a, "energies", 9, np.nan)),
        {"indices": [11, 9, 3]},
        [11, 3],
        {"count": 1, "frames": [9], "keys": ["energies"]},
    ),
    (
        "sgdml",
        lambda t: sgdml_file(t, lambda a: _set(a, "F", (4, 2, 1), np.inf)),
        {},
        [i for i in range(20) if i != 4],
        {"count": 1, "frames": [4], "keys": ["F"]},
    ),
    (
        "extxyz energy and forces of one frame",
        lambda t: mace_extxyz(
            t,
            lambda fr: (fr[1].info.update(REF_energy=float("nan")), _set(fr[1].arrays, "REF_forces", (0, 0), np.nan)),
        ),
        {"energy_key": "REF_energy", "forces_key": "REF_forces"},
        [0, 2, 3],
        {"count": 1, "frames": [1], "keys": ["REF_energy"]},
    ),
    (
        "extxyz stress",
        lambda t: periodic_extxyz(t, lambda fr: _set(fr[2][1], "stress", 0, np.nan)),
        {},
        [0, 1, 3],
        {"count": 1, "frames": [2], "keys": ["stress"]},
    ),
    (
        "SPICE, one group dropped whole",
        lambda t: tiny_spice(
            t,
            lambda a: (
                _set(a["mol_a"], "dft_total_gradient", (1, 0, 0), np.nan),
                a["mol_b"]["dft_total_energy"].fill(np.nan),
            ),
            groups=("mol_a", "mol_b", "mol_c"),
        ),
        {},
        [0, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5],
        {
            "count": 7,
            "frames": [1, 0, 1, 2, 3, 4, 5],
            "keys": ["mol_a/dft_total_gradient"] + ["mol_b/dft_total_energy"] * 6,
        },
    ),
    (
        "mlearn",
        lambda t: mlearn_file(t, lambda e: e[0]["outputs"].update(energy=float("-inf"))),
        {},
        [1, 2, 3, 4],
        {"count": 1, "frames": [0], "keys": ["outputs.energy"]},
    ),
]


@pytest.mark.parametrize("case,build,kwargs,kept,record", DROPS, ids=[c[0] for c in DROPS])
def test_drop_keeps_the_finite_frames_and_reports_the_rest(tmp_path, caplog, case, build, kwargs, kept, record):
    p = build(tmp_path)
    with caplog.at_level(logging.WARNING, logger="so3lib.data"):
        ds = d.read(p, nonfinite="drop", **kwargs)
    assert ds.meta["frame"].tolist() == kept and len(ds) == len(kept)
    assert ds.dropped_nonfinite == record
    assert np.isfinite(ds.energy).all() and np.isfinite(ds.forces).all()
    shown = ", ".join(f"{f} ('{k}')" for f, k in zip(record["frames"], record["keys"]))
    warnings = [r for r in caplog.records if r.name == "so3lib.data"]
    assert [r.getMessage() for r in warnings] == [
        f"{p}: dropped {record['count']} frame(s) with NaN or infinite labels (nonfinite='drop'): frames {shown}"
    ]
    assert warnings[0].levelno == logging.WARNING


def test_drop_warning_names_the_first_frames_only(tmp_path, caplog):
    p = rmd17_file(tmp_path, lambda a: a["energies"][:15].fill(np.nan))
    with caplog.at_level(logging.WARNING, logger="so3lib.data"):
        ds = d.read(p, nonfinite="drop")
    assert len(ds) == 5 and ds.dropped_nonfinite["count"] == 15 and ds.dropped_nonfinite["frames"] == list(range(15))
    first = ", ".join(f"{i} ('energies')" for i in range(10))
    assert [r.getMessage() for r in caplog.records if r.name == "so3lib.data"] == [
        f"{p}: dropped 15 frame(s) with NaN or infinite labels (nonfinite='drop'): frames {first}, ... (5 more)"
    ]


def test_drop_of_every_frame_is_an_error(tmp_path):
    p = rmd17_file(tmp_path, lambda a: a["energies"].fill(np.nan), n=4)
    with pytest.raises(d.DataError) as exc:
        d.read(p, nonfinite="drop")
    assert str(exc.value) == (
        f"{p}: empty dataset: every one of the 4 frames has a NaN or infinite label, and nonfinite='drop' dropped "
        "them all (the first: key 'energies', frame 0)"
    )


def test_clean_files_record_no_drops_and_subsets_carry_none(tmp_path):
    ds = d.read(rmd17_file(tmp_path), nonfinite="drop")
    assert len(ds) == 20 and ds.dropped_nonfinite == {"count": 0, "frames": [], "keys": []}
    dropped = d.read(rmd17_file(tmp_path, lambda a: _set(a, "energies", 2, np.nan), name="b.npz"), nonfinite="drop")
    assert dropped.subset([0, 1]).dropped_nonfinite["count"] == 0  # a split is not a read
    both = d.Dataset.concatenate([dropped, dropped])
    assert both.dropped_nonfinite == {"count": 2, "frames": [2, 2], "keys": ["energies", "energies"]}


# ---------------------------------------------------------------------------------------------- absent labels
def test_extxyz_frames_without_an_energy_load_unlabelled(tmp_path, caplog):
    def edit(frames):
        for _, res in (frames[1], frames[3]):
            del res["energy"]
        del frames[2][1]["forces"]
        del frames[0][1]["stress"]

    p = periodic_extxyz(tmp_path, edit)
    with caplog.at_level(logging.WARNING, logger="so3lib.data"):
        ds = d.read(p)
    assert len(ds) == 4 and ds.dropped_nonfinite["count"] == 0 and not caplog.records
    assert np.isnan(ds.energy[[1, 3]]).all() and np.isfinite(ds.energy[[0, 2]]).all()
    assert ds[1].energy is None and ds[0].energy == -1.0
    assert np.isnan(ds.forces[4:6]).all() and np.isfinite(np.delete(ds.forces, [4, 5], axis=0)).all()
    assert ds[0].stress is None and np.isfinite(ds.stress[1:]).all()
    assert d.read(p, nonfinite="drop").dropped_nonfinite["count"] == 0  # absent is not non-finite


def test_absent_labels_of_npz_and_mlearn(tmp_path):
    ds = d.read(sgdml_file(tmp_path, drop=("F",)))  # an sGDML file without F: no forces, not an error
    assert len(ds) == 20 and ds.forces is None and np.isfinite(ds.energy).all()
    p = mlearn_file(
        tmp_path, lambda e: (e[2]["outputs"].pop("virial_stress"), e[3]["outputs"].update(virial_stress=None))
    )
    ds = d.read(p)
    assert np.isnan(ds.stress[[2, 3]]).all() and np.isfinite(ds.stress[[0, 1, 4]]).all()
    assert ds[2].stress is None
    p = mlearn_file(tmp_path, lambda e: e[1]["outputs"].update(virial_stress=[1.0, 2.0]), name="short.json")
    with pytest.raises(d.DataError) as exc:
        d.read(p)
    assert str(exc.value) == (
        f"{p}, key 'outputs.virial_stress', frame 1: virial_stress has shape (2,), expected (6,) (xx yy zz xy yz zx)"
    )


def test_labelled_masks_of_from_arrays():
    pos = np.array([[[0.0, 0, 0], [0, 0, 0.8]]] * 3)
    e = np.array([1.0, np.nan, 2.0])
    with pytest.raises(d.DataError, match=r"^x.npz, key 'E', frame 1: NaN or infinite value$"):
        d.Dataset.from_arrays(source="x.npz", numbers=[1, 1], positions=pos, energy=e, keys={"energy": "E"})
    ds = d.Dataset.from_arrays(
        source="x.npz", numbers=[1, 1], positions=pos, energy=e, labelled={"energy": [True, False, True]}
    )
    assert np.isnan(ds.energy[1]) and ds[1].energy is None and ds.dropped_nonfinite["count"] == 0
    # values of frames the mask marks unlabelled are ignored: absent
    ds = d.Dataset.from_arrays(
        source="x.npz", numbers=[1, 1], positions=pos, energy=[1.0, 5.0, 2.0], labelled={"energy": [True, False, True]}
    )
    assert np.isnan(ds.energy[1])
    with pytest.raises(d.DataError, match=r"labelled\['energy'\] has shape \(2,\), expected \(3,\)"):
        d.Dataset.from_arrays(source="x.npz", numbers=[1, 1], positions=pos, energy=e, labelled={"energy": [1, 0]})


# ---------------------------------------------------------------------------------------------- SPICE filters
def _nan_spice(tmp_path):
    def edit(a):
        a["mol_a"]["dft_total_gradient"][2, 0, 0] = np.nan
        a["mol_a"]["dft_total_energy"][4] = np.inf
        a["mol_b"]["dft_total_gradient"][:, 1, 2] = np.nan  # every conformer of mol_b

    return tiny_spice(tmp_path, edit, groups=("mol_a", "mol_b", "mol_c"))


def test_spice_filter_errors_by_default_even_with_a_force_threshold(tmp_path):
    p = _nan_spice(tmp_path)
    for kw in ({}, {"max_force_ev_per_a": 1e-6}):  # a threshold does not hide NaN conformers any more
        with pytest.raises(d.DataError) as exc:
            filter_spice(p, neutral_only=False, **kw)
        assert str(exc.value) == f"{p}, key 'mol_a/dft_total_gradient', frame 2: {NAN_MSG}"
    with pytest.raises(d.DataError) as exc:
        convert_spice(p, tmp_path / "store", neutral_only=False, max_force_ev_per_a=1e-6, progress=False)
    assert str(exc.value) == f"{p}, key 'mol_a/dft_total_gradient', frame 2: {NAN_MSG}"


def test_spice_filter_drops_nonfinite_under_its_own_reason(tmp_path, caplog):
    p = _nan_spice(tmp_path)
    fin, _ = filter_spice(p, neutral_only=False, groups=["mol_c"])
    fmax = np.abs(fin.forces).reshape(6, -1).max(axis=1)
    thr = float(np.sort(fmax)[2])  # mol_c loses its 3 largest-force conformers to the threshold
    with caplog.at_level(logging.WARNING, logger="so3lib.data"):
        kept, rep = filter_spice(p, neutral_only=False, max_force_ev_per_a=thr, nonfinite="drop")
    assert rep["dropped"]["nonfinite"] == {
        "molecules": 1,
        "conformers": 8,
        "names": ["mol_a", "mol_b"],
        "frames": {"mol_a": [2, 4], "mol_b": [0, 1, 2, 3, 4, 5]},
    }
    over_a = [i for i in (0, 1, 3, 5) if fmax[i] > thr]  # mol_a has mol_c's conformers
    mf = rep["dropped"]["max_force"]
    assert mf["conformers"] == 3 + len(over_a) and mf["molecules"] == 0 and "mol_b" not in mf["names"]
    assert rep["conformers_in"] == 18 and rep["conformers_kept"] == 18 - 8 - 3 - len(over_a) == len(kept)
    assert rep["molecules_in"] == 3 and rep["molecules_kept"] == 2
    assert [(n, f) for n, f in zip(kept.meta["name"], kept.meta["frame"]) if n == "mol_a"] == [
        ("mol_a", i) for i in (0, 1, 3, 5) if i not in over_a
    ]
    assert [r.getMessage() for r in caplog.records if r.name == "so3lib.data"] == [
        f"{p}: dropped 8 conformer(s) of 2 molecule(s) with a NaN or infinite dft_total_energy or dft_total_gradient "
        "(nonfinite='drop'), by molecule: mol_a: [2, 4]; mol_b: [0, 1, 2, 3, 4] ..."
    ]
    # the store: the same report in its manifest, the option in its fingerprint
    store = convert_spice(
        p, tmp_path / "store", neutral_only=False, max_force_ev_per_a=thr, nonfinite="drop", progress=False
    )
    m = read_manifest(store)
    assert m["report"] == json.loads(json.dumps(rep)) and m["frames"] == len(kept)
    assert m["fingerprint"]["nonfinite"] == "drop" and set(m["report"]["dropped"]) == {
        "no_conformations",
        "element",
        "charged",
        "nonfinite",
        "max_force",
    }


def test_spice_report_keeps_its_keys_on_clean_files():
    kept, rep = filter_spice(SPICE_SAMPLE, neutral_only=False)
    assert rep["dropped"]["nonfinite"] == {"molecules": 0, "conformers": 0, "names": [], "frames": {}}
    assert rep["dropped"]["element"]["names"] == ["C#C.[Na+]"] and len(kept) == 50


# ---------------------------------------------------------------------------------------------- metrics
def _sums(n_e, n_f, n_s=None):
    s = {"e_abs": 2.0 * n_e, "e_sq": 9.0 * n_e, "ea_abs": 0.5 * n_e, "ea_sq": 0.25 * n_e, "n_e": n_e}
    s.update(f_abs=3.0 * n_f, f_sq=16.0 * n_f, n_f=n_f)
    if n_s is not None:
        s.update(s_abs=0.1 * n_s, s_sq=0.04 * n_s, n_s=n_s)
    return s


ENERGY = {"energy_mae_ev": 2.0, "energy_rmse_ev": 3.0, "energy_mae_per_atom_ev": 0.5, "energy_rmse_per_atom_ev": 0.5}
FORCES = {"forces_mae_ev_per_a": 3.0, "forces_rmse_ev_per_a": 4.0}
STRESS = {"stress_mae_ev_per_a3": 0.1, "stress_rmse_ev_per_a3": 0.2}
METRICS = [  # (case, sums, expected metrics)
    ("all labels", _sums(4.0, 30.0), {**ENERGY, **FORCES, "n_structures": 4}),
    ("no energies", _sums(0.0, 30.0), {**dict.fromkeys(ENERGY), **FORCES, "n_structures": 0}),
    ("no forces", _sums(4.0, 0.0), {**ENERGY, **dict.fromkeys(FORCES), "n_structures": 4}),
    ("nothing", _sums(0.0, 0.0), {**dict.fromkeys(ENERGY), **dict.fromkeys(FORCES), "n_structures": 0}),
    ("stress", _sums(4.0, 30.0, 18.0), {**ENERGY, **FORCES, **STRESS, "n_structures": 4}),
    ("no stress", _sums(4.0, 30.0, 0.0), {**ENERGY, **FORCES, **dict.fromkeys(STRESS), "n_structures": 4}),
]


@pytest.mark.parametrize("case,sums,expected", METRICS, ids=[c[0] for c in METRICS])
def test_metrics_over_no_label_are_none(case, sums, expected):
    from so3lib.training.loss import metrics_from_sums

    m = metrics_from_sums(sums)
    assert m.keys() == expected.keys()
    for k, v in expected.items():
        assert (m[k] is None) == (v is None), k
        if v is not None:
            assert m[k] == pytest.approx(v, rel=1e-12), k


# ---------------------------------------------------------------------------------------------- plots
def _metrics_csv(path, rows):
    fields = ["step", "train_loss", "val_loss", "val_energy_mae_mev", "val_forces_mae_mev_per_a"]
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fields)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in fields})
    return path


PNG = b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "case,rows",
    [
        (
            "forces only",
            [
                {"step": s, "train_loss": 1.0 / s, "val_loss": 2.0 / s, "val_forces_mae_mev_per_a": 50.0 / s}
                for s in (1, 2, 3)
            ],
        ),
        ("train loss only", [{"step": s, "train_loss": 1.0 / s} for s in (1, 2)]),
        ("header only", []),
    ],
)
def test_learning_curve_draws_what_exists(tmp_path, case, rows):
    from so3lib import plotting

    csv_path = _metrics_csv(tmp_path / "metrics.csv", rows)
    out = plotting.learning_curve(csv_path, tmp_path / "lc.png")
    assert out == tmp_path / "lc.png" and out.read_bytes()[:8] == PNG


def test_parity_without_points_writes_nothing(tmp_path):
    from so3lib import plotting

    for target, pred in ((np.array([]), np.array([])), (np.full(4, np.nan), np.ones(4))):
        assert plotting.parity(target, pred, tmp_path / "p.png", "energy", "eV") is None
        assert not (tmp_path / "p.png").exists()
    out = plotting.parity(np.array([1.0, np.nan, 3.0]), np.array([1.1, 0.0, np.nan]), tmp_path / "p.png", "e", "eV")
    assert out == tmp_path / "p.png" and out.read_bytes()[:8] == PNG


def test_error_sums_count_stress_only_where_labelled(li_test):
    """Stress metrics from `error_sums` of a stress prediction: over the frames with a stress label only, None
    when no frame of the batch has one."""
    from physics import graph, make_potential

    from so3lib.training.loss import error_sums, metrics_from_sums

    pot, params = make_potential("schnet", {"n_atom_basis": 8, "n_interactions": 1, "cutoff": 4.0}, li_test)
    frames = [0, 1, 2]
    g = graph(pot, li_test, frames)
    pred = pot(params, g, compute_stress=True)
    m = metrics_from_sums({k: float(v) for k, v in error_sums(pred, g).items()})
    ref = li_test.stress[frames]
    err = np.abs(np.asarray(pred["stress"])[: len(frames)] - ref)
    assert m["stress_mae_ev_per_a3"] == pytest.approx(float(err.mean()), rel=1e-9)
    assert m["stress_rmse_ev_per_a3"] == pytest.approx(float(np.sqrt((err**2).mean())), rel=1e-9)
    unlabelled = g._replace(globals={**g.globals, "has_stress": np.zeros_like(np.asarray(g.globals["has_stress"]))})
    m = metrics_from_sums({k: float(v) for k, v in error_sums(pred, unlabelled).items()})
    assert m["stress_mae_ev_per_a3"] is None and m["stress_rmse_ev_per_a3"] is None
    assert m["forces_mae_ev_per_a"] is not None
    assert "stress_mae_ev_per_a3" not in metrics_from_sums(
        {k: float(v) for k, v in error_sums({k: v for k, v in pred.items() if k != "stress"}, g).items()}
    )


def test_spice_drop_of_every_conformer_is_an_error(tmp_path):
    p = tiny_spice(tmp_path, lambda a: [a[g]["dft_total_energy"].fill(np.nan) for g in a])
    with pytest.raises(d.DataError) as exc:
        d.read(p, nonfinite="drop")
    assert str(exc.value) == (
        f"{p}: empty dataset: every one of the 12 conformers has a NaN or infinite label, and nonfinite='drop' "
        "dropped them all (the first: key 'mol_a/dft_total_energy', frame 0)"
    )
