"""Hostile but realistic input, table-driven. Every case asserts the exact behaviour: at the command line a
one-line error (`so3lib: error: ...`, exit status 2) with the words that name the file, key, frame or option,
and the user's files untouched; in the library the error type and its words; or the correct result."""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest
from conftest import ETHANOL_TRAIN
from hostile_files import build, holding_lock

from so3lib.cli import main


@pytest.fixture(scope="module")
def f(tmp_path_factory):
    return build(tmp_path_factory.mktemp("hostile"))


@pytest.fixture(scope="module")
def clirun(f, tmp_path_factory):
    """A run trained through the command line (its config.yaml is what --config reads back)."""
    out = tmp_path_factory.mktemp("hostile_cli") / "run"
    argv = ["train", "--train", str(f["ok"]), "--e0s", "average", "--n-atom-basis", "8", "--n-interactions", "1"]
    assert main([*argv, "--max-steps", "4", "--eval-every-steps", "2", "--out", str(out), "--no-progress"]) == 0
    return out


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    argv: tuple[str, ...]  # {name}: a file of `build`; {run}, {clirun}: the trained run; {tmp}: a fresh folder
    words: str  # a regular expression the one error line must match (after 'so3lib: error: ')


TRAIN = ("train", "--max-steps", "1", "--max-epochs", "none", "--no-progress")
CASES = [
    # ---- data files: each names the file, and the key and frame where there is one
    Case("missing file", ("inspect", "{missing}"), r"nothing_here\.xyz: no such data file"),
    Case("a directory", ("inspect", "{dir}"), r"hostile\d*: is a directory, expected a data file"),
    Case("empty file", ("inspect", "{empty}"), r"empty\.xyz: cannot be read by ase\.io .*Empty file"),
    Case("truncated npz", ("inspect", "{truncated}"), r"truncated\.npz: corrupted or truncated npz file"),
    Case(
        "npz of no known layout",
        ("inspect", "{wrongkeys}"),
        r"wrongkeys\.npz: npz file with keys \['a', 'b'\] is neither rMD17",
    ),
    Case(
        "frame counts differ",
        ("inspect", "{mismatch}"),
        r"mismatch\.npz, key 'energies': 29 frames, but 'coords' has 30",
    ),
    Case(
        "element 0",
        ("inspect", "{z0}"),
        r"z0\.npz, key 'nuclear_charges', frame 0: unknown element with atomic number 0",
    ),
    Case(
        "element 200",
        ("inspect", "{z200}"),
        r"z200\.npz, key 'nuclear_charges', frame 0: unknown element with atomic number 200",
    ),
    Case(
        "atoms on top of each other",
        ("inspect", "{close}"),
        r"close\.npz, key 'coords', frame 3: atoms 0 and 1 are 0\.01\d+ Å apart",
    ),
    Case(
        "forces of the wrong shape",
        ("inspect", "{sgdml_fshape}"),
        r"sgdml_fshape\.npz, key 'F': shape \(30, 8, 3\) does not match positions",
    ),
    Case(
        "MACE-style labels without keys",
        ("inspect", "{mace}"),
        r"mace\.extxyz, key 'energy': no energy label .* info keys \['REF_energy'.*--energy-key NAME",
    ),
    Case(
        "a named key missing in one frame",
        ("inspect", "{mace_gap}", "--energy-key", "REF_energy", "--forces-key", "REF_forces"),
        r"mace_gap\.extxyz, key 'REF_energy', frame 2: no energy label 'REF_energy' in this frame",
    ),
    Case(
        "periodic without a cell",
        ("inspect", "{zero_cell}"),
        r"zero_cell\.extxyz, key 'cell', frame 0: periodic frame .* zero-volume cell",
    ),
    Case(
        "virial without a cell",
        ("inspect", "{virial_nocell}"),
        r"virial_nocell\.extxyz, key 'virial', frame 0: virial given for a frame without a periodic cell",
    ),
    Case("not an HDF5 file", ("inspect", "{garbage_h5}"), r"garbage\.h5: corrupted, truncated or not an HDF5 file"),
    Case(
        "keys for a format with fixed keys",
        ("inspect", "{li}", "--energy-key", "E"),
        r"mlearn files have fixed label keys",
    ),
    Case(
        "a SPICE file whose groups hold no conformation",
        ("inspect", "{spice_only_empty}"),
        r"spice_only_empty\.hdf5: empty dataset: no molecule group with conformations \(groups without any: c1ccccc1\)",
    ),
    Case(
        "a NaN energy label",
        ("inspect", "{nan_energy}"),
        r"nan_energy\.npz, key 'energies', frame 4: NaN or infinite value",
    ),
    Case(
        "an infinite force label",
        ("inspect", "{inf_force}"),
        r"inf_force\.npz, key 'forces', frame 7: NaN or infinite value",
    ),
    Case(
        "NaN labels dropped when asked, then too few for a split",
        (
            *TRAIN,
            "--train",
            "{nan_energy}",
            "--drop-nonfinite-labels",
            "--e0s",
            "average",
            "--val-fraction",
            "0.01",
            "--out",
            "{tmp}/r",
        ),
        r"nan_energy\.npz: 29 frames × val_fraction 0\.01 leaves no validation frame",
    ),
    # ---- the energy reference
    Case(
        "undetermined reference",
        (*TRAIN, "--train", "{ok}", "--out", "{tmp}/r"),
        r"ok\.npz, key 'energy': per-element energy reference is not determined: .* rank 1 for 3 elements \(H, C, O\)",
    ),
    Case(
        "E0s with an unknown element",
        (*TRAIN, "--train", "{ok}", "--e0s", "{e0s_symbol}", "--out", "{tmp}/r"),
        r"e0s_symbol\.yaml, key 'Xx': unknown element",
    ),
    Case(
        "E0s that are not numbers",
        (*TRAIN, "--train", "{ok}", "--e0s", "{e0s_text}", "--out", "{tmp}/r"),
        r"e0s_text\.yaml, key 'C': isolated-atom energy 'low' is not a number",
    ),
    Case(
        "E0s lacking elements",
        (*TRAIN, "--train", "{ok}", "--e0s", "{e0s_missing}", "--out", "{tmp}/r"),
        r"isolated-atom energies lack elements C, O",
    ),
    Case(
        "E0s neither a method nor a file",
        (*TRAIN, "--train", "{ok}", "--e0s", "lsq", "--out", "{tmp}/r"),
        r"--e0s 'lsq': neither lstsq, lstsq\+intercept, average nor an existing YAML/JSON file",
    ),
    # ---- splits
    Case(
        "too few frames for a validation split",
        (*TRAIN, "--train", "{ten}", "--e0s", "average", "--out", "{tmp}/r"),
        r"ten\.npz: 10 frames × val_fraction 0\.05 leaves no validation frame",
    ),
    # ---- options, flags and config files
    Case(
        "misspelt boolean flag",
        ("train", "--model", "bpnn", "--train", "{ok}", "--standardize", "flase"),
        r"argument --standardize: invalid boolean 'flase' \(use true or false\)",
    ),
    Case(
        "another model's flag",
        ("train", "--train", "{ok}", "--l-max", "2"),
        r"--l-max is an option of model so3krates, not of schnet",
    ),
    Case(
        "unknown model",
        ("train", "--model", "painn", "--train", "{ok}"),
        r"unknown model 'painn'; registered models: bpnn, schnet, so3krates",
    ),
    Case("unknown command", ("fit", "--train", "{ok}"), r"unknown command 'fit'; commands: train, md17"),
    Case("missing required option", ("train",), r"so3lib train: --train: missing"),
    Case(
        "fraction out of range",
        ("train", "--train", "{ok}", "--val-fraction", "1.5"),
        r"--val-fraction: Input should be less than 1",
    ),
    Case(
        "not an integer",
        ("train", "--train", "{ok}", "--batch-size", "many"),
        r"argument --batch-size: invalid int value: 'many'",
    ),
    Case(
        "invalid choice",
        ("train", "--train", "{ok}", "--schedule", "weekly"),
        r"argument --schedule: invalid choice 'weekly' \(choose from constant, exponential, cosine, linear, plateau\)",
    ),
    Case(
        "batch size zero",
        ("train", "--train", "{ok}", "--batch-size", "0"),
        r"training options: --batch-size: Input should be greater than or equal to 1",
    ),
    Case(
        "no budget at all",
        ("train", "--train", "{ok}", "--max-epochs", "none"),
        r"set at least one of max_epochs, max_steps, max_minutes",
    ),
    Case("config file missing", ("train", "--config", "{tmp}/nope.yaml"), r"nope\.yaml: no such config file"),
    Case("config not YAML", ("train", "--config", "{bad_yaml}"), r"bad\.yaml: not valid YAML"),
    Case(
        "config not a mapping",
        ("train", "--config", "{list_yaml}"),
        r"list\.yaml: a config file is a mapping of option names to values, not a list",
    ),
    Case("unknown flag", ("inspect", "{ok}", "--jsn"), r"unrecognized arguments: --jsn"),
    # ---- files so3lib did not create are never deleted or overwritten
    Case(
        "a store path holding the user's files",
        ("spice", "--store", "{foreign}", "--max-steps", "1"),
        r"project: exists and is not a so3lib store .* choose another --store",
    ),
    # ---- run folders: one writer, nothing overwritten, a resumed run is the same run
    Case(
        "--out holding the user's files",
        (*TRAIN, "--train", "{ok}", "--e0s", "average", "--out", "{foreign}"),
        r"project: holds files so3lib did not write \(thesis\.tex\); .* choose another output folder",
    ),
    Case(
        "--out that is a file",
        (*TRAIN, "--train", "{ok}", "--e0s", "average", "--out", "{afile}"),
        r"afile\.txt: exists and is not a folder",
    ),
    Case(
        "a finished run without --resume",
        ("train", "--config", "{clirun}/config.yaml", "--out", "{clirun}"),
        r"hostile_cli\d*/run already holds a run: pass resume=True \(--resume\)",
    ),
    Case(
        "--resume with another learning rate",
        ("train", "--config", "{clirun}/config.yaml", "--out", "{clirun}", "--resume", "--learning-rate", "0.01"),
        r"--resume refuses a changed run \(config\.training\.learning_rate: 0\.001 → 0\.01\)",
    ),
    Case(
        "--resume on other data",
        ("train", "--config", "{clirun}/config.yaml", "--out", "{clirun}", "--resume", "--train", "{ok40}"),
        r"--resume refuses a changed run \(data\.train: content changed \(28 → 38 frames\); data\.val: content changed",
    ),
    Case(
        "--resume with another model width",
        ("train", "--config", "{clirun}/config.yaml", "--out", "{clirun}", "--resume", "--n-atom-basis", "16"),
        r"config\.model\.n_atom_basis: 8 → 16",
    ),
    # ---- checked before the first step
    Case(
        "a cutoff that leaves no edges",
        (*TRAIN, "--train", "{ok}", "--e0s", "average", "--cutoff", "0.3", "--out", "{tmp}/r"),
        r"ok\.npz: the cutoff 0\.3 Å leaves no neighbour pair in any training structure",
    ),
    Case(
        "a test set with elements training never saw",
        (*TRAIN, "--train", "{ok}", "--e0s", "average", "--test", "{li}", "--out", "{tmp}/r"),
        r"test set \(.*li_mlearn_test\.json\), key 'numbers': elements \[3\] have no energy reference",
    ),
    Case(
        "stress asked for, none in the data",
        (*TRAIN, "--train", "{ok}", "--e0s", "average", "--stress-weight", "1", "--out", "{tmp}/r"),
        r"ok\.npz, key 'stress': stress_weight 1 but no training frame has a stress label with a periodic cell",
    ),
    # ---- MD
    Case(
        "MD without a run",
        ("md", "--run", "{tmp}/none", "--structure", "{mace}", "--out", "{tmp}/md"),
        r"none: no such run folder",
    ),
    Case(
        "MD structure missing",
        ("md", "--run", "{run}", "--structure", "{missing}", "--out", "{tmp}/md"),
        r"nothing_here\.xyz: no such structure file",
    ),
    Case(
        "MD with elements the model lacks",
        ("md", "--run", "{run}", "--structure", "{li}", "--out", "{tmp}/md", "--no-progress"),
        r"elements \[3\] have no energy reference \(the model knows \[1, 6, 8\]\)",
    ),
    Case(
        "MD frame out of range",
        ("md", "--run", "{run}", "--structure", "{ok}", "--frame", "99", "--out", "{tmp}/md"),
        r"ok\.npz: frame 99 out of range \(30 frames\)",
    ),
    Case(
        "MD of one atom (ASE)",
        ("md", "--run", "{run}", "--structure", "{one_atom}", "--engine", "ase", "--out", "{tmp}/md"),
        r"MD needs at least 2 atoms, the structure has 1",
    ),
    Case(
        "MD of one atom (jax-md)",
        ("md", "--run", "{run}", "--structure", "{one_atom}", "--out", "{tmp}/md"),
        r"MD needs at least 2 atoms, the structure has 1",
    ),
    Case(
        "MD of a far too large system",
        (
            "md",
            "--run",
            "{run}",
            "--structure",
            "{free_with_cell}",
            "--supercell",
            "40",
            "40",
            "40",
            "--out",
            "{tmp}/md",
            "--no-progress",
        ),
        r"576000 atoms need about \d+(\.\d+)? TB for MD .*use a smaller --supercell",
    ),
    Case(
        "NPT of a molecule (jax-md)",
        ("md", "--run", "{run}", "--structure", "{ok}", "--ensemble", "npt", "--pressure", "1", "--out", "{tmp}/md"),
        r"NPT \(--pressure 1\.0 bar\) needs a cell periodic in all three directions; .* pbc=\[False, False, False\]",
    ),
    Case(
        "NPT of a molecule (ASE)",
        (
            "md",
            "--run",
            "{run}",
            "--structure",
            "{free_with_cell}",
            "--ensemble",
            "npt",
            "--pressure",
            "1000",
            "--engine",
            "ase",
            "--out",
            "{tmp}/md",
        ),
        r"NPT \(--pressure 1000\.0 bar\) needs a cell periodic in all three directions",
    ),
    Case(
        "NPT in an engine without a barostat",
        (
            "md",
            "--run",
            "{run}",
            "--structure",
            "{ok}",
            "--ensemble",
            "npt",
            "--pressure",
            "1",
            "--engine",
            "lammps",
            "--out",
            "{tmp}/md",
        ),
        r"--ensemble npt needs --engine jax-md or ase \(the lammps engine has no barostat\)",
    ),
    Case(
        "MD pressure without NPT",
        ("md", "--run", "{run}", "--structure", "{ok}", "--pressure", "1", "--out", "{tmp}/md"),
        r"--pressure 1\.0 needs --ensemble npt \(got --ensemble nve\)",
    ),
    Case(
        "NPT without a pressure",
        ("md", "--run", "{run}", "--structure", "{ok}", "--ensemble", "npt", "--out", "{tmp}/md"),
        r"--ensemble npt needs a target pressure: --pressure BAR",
    ),
    Case(
        "NPT of a cell too small for the cutoff",
        (
            "md",
            "--run",
            "{run}",
            "--structure",
            "{small_box}",
            "--ensemble",
            "npt",
            "--pressure",
            "1",
            "--out",
            "{tmp}/md",
            "--no-progress",
        ),
        r"cell heights \[6\.0, 6\.0, 6\.0\] Å are below twice the cutoff \+ skin \(12\.00 Å\): minimum image fails",
    ),
    Case(
        "MD time step negative",
        ("md", "--run", "{run}", "--structure", "{ok}", "--dt", "-1", "--out", "{tmp}/md"),
        r"--dt: Input should be greater than 0",
    ),
    # ---- predict
    Case("predict without a run", ("predict", "{tmp}/none", "{ok}"), r"none: no such run folder"),
    Case(
        "predict a file of other elements",
        ("predict", "{run}", "{li}", "--out", "{tmp}/p.extxyz"),
        r"li_mlearn_test\.json, key 'numbers': elements \[3\] have no energy reference",
    ),
    Case("predict a missing file", ("predict", "{run}", "{missing}"), r"nothing_here\.xyz: no such data file"),
    # ---- sweeps
    Case(
        "sweep --param without values",
        ("sweep", "--model", "schnet", "--data", "rmd17:ethanol", "--param", "cutoff"),
        r"--param 'cutoff': expected NAME=V1,V2,\.\.\.",
    ),
    Case(
        "sweep over another model's option",
        ("sweep", "--model", "schnet", "--data", "rmd17:ethanol", "--param", "l_max=1,2"),
        r"invalid sweep: unknown parameter 'l_max' \('l_max' is not an option of model 'schnet'\)",
    ),
    Case("sweep file not YAML", ("sweep", "{bad_yaml}"), r"bad\.yaml: not valid YAML"),
    # ---- ensembles and uncertainty (issue #17)
    Case(
        "an ensemble of one",
        (*TRAIN, "--train", "{ok}", "--e0s", "average", "--ensemble", "1", "--out", "{tmp}/r"),
        r"--ensemble: ensemble 1: an ensemble needs at least 2 members",
    ),
    Case(
        "max uncertainty of a single model",
        ("md", "--run", "{run}", "--structure", "{ok}", "--max-uncertainty", "0.5", "--out", "{tmp}/md"),
        r"--max-uncertainty needs an ensemble run, and .*run is a single model",
    ),
    Case(
        "max uncertainty not positive",
        ("md", "--run", "{run}", "--structure", "{ok}", "--max-uncertainty", "0", "--out", "{tmp}/md"),
        r"--max-uncertainty: Input should be greater than 0",
    ),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_command_line(case, f, clirun, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = {p: p.read_bytes() for p in f["foreign"].rglob("*") if p.is_file()}
    subs = {**{k: str(v) for k, v in f.items()}, "run": str(clirun), "clirun": str(clirun), "tmp": str(tmp_path)}
    argv = [a.format(**subs) for a in case.argv]
    code = main(argv)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("so3lib: error: "), err
    assert re.search(case.words, err[0]), err[0]
    assert {p: p.read_bytes() for p in f["foreign"].rglob("*") if p.is_file()} == before  # the user's files
    assert not (tmp_path / "r" / "checkpoints").exists()  # refused before the first step


def test_the_refused_commands_left_the_trained_run_as_it_was(clirun):
    import json

    res = json.loads((clirun / "results.json").read_text())
    assert res["steps"] == 4 and res["steps_per_s"] is None  # 3 timed steps: too few to measure, absent not 1e10
    assert sorted(int(p.name) for p in (clirun / "checkpoints").iterdir() if p.name.isdigit())[-1] == 4


def test_a_second_process_on_the_same_folder_is_refused_naming_the_first(f, tmp_path, capsys):
    out = tmp_path / "busy"
    with holding_lock(out) as pid:
        assert main([*TRAIN, "--train", str(f["ok"]), "--e0s", "average", "--out", str(out)]) == 2
        (err,) = capsys.readouterr().err.strip().splitlines()
        assert re.fullmatch(rf"so3lib: error: {out}: in use by pid {pid} on .+; wait for it to finish .*", err)


def test_a_metric_that_cannot_be_computed_is_absent_and_its_plot_skipped(f, clirun, tmp_path):
    """A test file without energies, a file without forces: the missing metric is null (never 0), the plot of
    what is absent is not drawn, everything else is written."""
    import json

    out = tmp_path / "r"
    argv = [*TRAIN, "--train", str(f["ok"]), "--e0s", "average", "--n-atom-basis", "8", "--n-interactions", "1"]
    assert main([*argv, "--test", str(f["forces_only"]), "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["test"]["forces_mae_ev_per_a"] > 0
    assert res["test"]["energy_mae_ev"] is None and res["test"]["energy_mae_per_atom_ev"] is None
    assert (out / "plots" / "parity_forces.png").exists() and not (out / "plots" / "parity_energy.png").exists()
    assert main(["predict", str(clirun), str(f["energy_only"]), "--out", str(tmp_path / "p.extxyz")]) == 0
    m = json.loads((tmp_path / "p.json").read_text())["metrics"]
    assert m["forces_ev_per_a"] is None and m["energy_ev"]["count"] == 6 and m["energy_ev"]["mae"] > 0


CALCULATOR_CASES = [  # (id, atoms, the error's words; None: a correct result)
    (
        "NaN position",
        lambda a: a.positions.__setitem__((1, 2), np.nan),
        r"<atoms>, key 'positions': NaN or infinite position of atom 1",
    ),
    ("infinite position", lambda a: a.positions.__setitem__((0, 0), np.inf), r"NaN or infinite position of atom 0"),
    (
        "periodic without a cell",
        lambda a: a.set_pbc(True),
        r"key 'cell': pbc=\[True, True, True\] but the cell .* is degenerate \(no lattice vector along periodic "
        r"direction\(s\) \[0, 1, 2\]\)",
    ),
    (
        "periodic along z without a z vector",
        lambda a: (a.set_cell([10.0, 10.0, 0.0]), a.set_pbc([False, False, True])),
        r"no lattice vector along periodic direction\(s\) \[2\]",
    ),
    (
        "an element the model lacks",
        lambda a: a.numbers.__setitem__(0, 3),
        r"elements \[3\] have no energy reference \(the model knows \[1, 6, 8\]\)",
    ),
    (
        "a slab without a vector along its open direction",
        lambda a: (a.set_cell([10.0, 10.0, 0.0]), a.set_pbc([True, True, False])),
        None,
    ),
    ("one atom", lambda a: a.__delitem__(slice(1, None)), None),
]


@pytest.mark.parametrize("case", CALCULATOR_CASES, ids=lambda c: c[0])
def test_calculator_inputs(case, clirun):
    import so3lib
    from so3lib import data

    _, change, words = case
    atoms = data.read(ETHANOL_TRAIN)[0].to_ase()
    atoms.calc = None
    change(atoms)
    atoms.calc = so3lib.load_calculator(clirun)
    if words is None:
        assert np.isfinite(atoms.get_potential_energy()) and np.isfinite(atoms.get_forces()).all()
        return
    with pytest.raises(data.DataError, match=words):
        atoms.get_potential_energy()
