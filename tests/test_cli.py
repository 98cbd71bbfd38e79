"""The ``so3lib`` command: options from presets, config files and flags (flags win), help that shows the
defaults in use, strict values, one-line errors with exit status 2, and a run's config.yaml that repeats it."""

import re
import subprocess
import sys
import typing
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import ETHANOL_TRAIN, ROOT, SPICE_SAMPLE

from so3lib.cli import main, parse


def _err(capsys, argv) -> str:
    """Run the command expecting a user error: exit status 2 and exactly one line on stderr."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("so3lib: error: ")
    return err[0]


def test_presets_then_config_then_flags(tmp_path):
    p = parse(["spice"])  # the bundled sample's preset
    assert p.model.n_atom_basis == 32 and p.training.learning_rate == 2e-3 and p.options.e0s == "average"
    cfg = tmp_path / "c.yaml"
    cfg.write_text("n_atom_basis: 48\nlearning_rate: 0.005\nmax_steps: 10\nsplit_seed: 3\n")
    p = parse(["spice", "--config", str(cfg), "--learning-rate", "0.0001"])
    assert p.model.n_atom_basis == 48 and p.model.n_interactions == 2  # file over preset, preset kept elsewhere
    assert p.training.learning_rate == 1e-4 and p.training.max_steps == 10 and p.options.split_seed == 3
    p = parse(["spice", "--data", "x.hdf5"])  # a real SPICE file: the full preset
    assert p.model.n_atom_basis == 128 and p.training.batch_size == 64 and p.options.e0s == "lstsq"
    q = parse(["md17", "--model", "so3krates", "--quick"])
    assert (q.model.features, q.model.l_max, q.training.max_steps) == (64, 2, 5000)
    q = parse(["md17", "--model", "bpnn"])
    assert q.training.max_epochs == 3000 and q.options.e0s == "average"
    # nested (model: {name: ...}) and flat keys, booleans from YAML, lists of objects only in files
    cfg.write_text(
        "model: {name: bpnn, hidden: [32, 16]}\nstandardize: false\ntrain: t.xyz\npreset: custom\ncutoff: 5.0\n"
        "symmetry_functions:\n  - {kind: G2, eta: 0.5, rs: 1.0}\n  - {kind: G5, eta: 0.01, zeta: 4, lam: -1}\n"
    )
    b = parse(["train", "--config", str(cfg), "--activation", "silu"])
    assert b.model.name == "bpnn" and b.model.hidden == (32, 16) and b.model.standardize is False
    assert b.model.activation == "silu" and b.model.symmetry_functions[1].lam == -1 and b.options.train == "t.xyz"


def test_every_preset_names_real_options():
    from so3lib import data
    from so3lib.workflows import active, common, md17, spice, sweeps, train

    assert typing.get_args(common.Format) == data.FORMATS
    for table, opts in (
        (md17.FULL, md17.MD17Options),
        (md17.QUICK, md17.MD17Options),
        (spice.SAMPLE, spice.SpiceOptions),
        (spice.FULL, spice.SpiceOptions),
        (train.PRESETS, train.TrainOptions),
        (active.PRESETS, active.ActiveOptions),
    ):
        table.check(set(opts.model_fields))
    for spec in sweeps.PRESETS.values():
        sweeps.SweepConfig.model_validate(spec)
    # no command option shadows a model or training option (a flat config key must have one meaning)
    from so3lib.models import available, hyperparameters
    from so3lib.training.config import TrainingConfig

    for opts in (train.TrainOptions, md17.MD17Options, spice.SpiceOptions, active.ActiveOptions):
        for m in available():
            clash = set(opts.model_fields) & (set(hyperparameters(m)) | set(TrainingConfig.model_fields))
            assert not clash, (opts.__name__, m, clash)
    # runtime options: where and how a run goes (out, resume, progress, the process group), not what it is
    assert set(common.RUNTIME_OPTIONS) <= set(common.RunOptions.model_fields) | set(spice.SpiceOptions.model_fields)


def test_help_shows_the_defaults_in_use_and_the_chosen_models_options(capsys):
    with pytest.raises(SystemExit) as e:
        main_help = parse(["spice", "--help"])  # noqa: F841
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--n-atom-basis INT    feature width F (default: 32)" in out
    assert "(default: 0.002)" in out and "(default: 600)" in out  # learning rate and steps of the sample run
    assert "--model {bpnn,schnet,so3krates}" in out and "MODEL:" not in out and "--l-max" not in out
    with pytest.raises(SystemExit):
        parse(["train", "--model", "so3krates", "--help"])
    out = capsys.readouterr().out
    assert "so3krates options:" in out and "--l-max INT" in out and "--n-atom-basis" not in out
    assert "--e0s METHOD|FILE" in out and "--train PATH" in out and "(required)" in out
    with pytest.raises(SystemExit):
        parse(["md17", "--quick", "--help"])
    out = capsys.readouterr().out
    assert "(default: 16000)" in out and "feature width F (default: 64)" in out


@pytest.mark.parametrize(
    "argv, words",
    [
        (["train", "--model", "bpnn", "--train", "x", "--standardize", "flase"], "invalid boolean 'flase'"),
        (["train", "--train", "x", "--l-max", "3"], "--l-max is an option of model so3krates, not of schnet"),
        (["train", "--model", "shnet", "--train", "x"], "unknown model 'shnet'"),
        (["trian"], "unknown command 'trian' (did you mean 'train'?)"),
        (["train"], "--train: missing"),
        (["spice", "--val-fraction", "2"], "--val-fraction: Input should be less than 1"),
        (["md17", "--molecule", "water"], "invalid choice 'water'"),
        (["train", "--train", "x", "--batch-size", "0"], "training options: --batch-size: Input should be greater"),
        (["train", "--train", "x", "--n-atom-basis", "many"], "argument --n-atom-basis: invalid int value: 'many'"),
        (["md17", "--config", "/no/such.yaml"], "/no/such.yaml: no such config file"),
    ],
)
def test_bad_command_lines_are_one_line_errors(capsys, argv, words):
    assert words in _err(capsys, argv)


def test_bad_config_files_are_one_line_errors(capsys, tmp_path):
    cfg = tmp_path / "c.yaml"
    cases = [
        (
            "lerning_rate: 0.1\n",
            f"{cfg}: unknown option 'lerning_rate' for so3lib train (did you mean 'learning_rate'?)",
        ),
        ("model: schnet\nl_max: 2\n", f"{cfg}: 'l_max' is an option of model so3krates, not of schnet"),
        ("model: {name: schnet, features: 8}\n", "'features' is an option of model so3krates, not of schnet"),
        ("training: {max_stepz: 3}\n", "unknown option 'max_stepz' for so3lib train (did you mean 'max_steps'?)"),
        ("- a\n- b\n", "a config file is a mapping of option names to values, not a list"),
        ("train: [unclosed\n", "not valid YAML"),
        ("train: t.xyz\nstandardize: flase\nmodel: bpnn\n", "standardize: Input should be a valid boolean"),
    ]
    for text, words in cases:
        cfg.write_text(text)
        assert words in _err(capsys, ["train", "--config", str(cfg)]), text
    cfg.write_text(yaml.safe_dump({"command": {"name": "spice", "options": {}}, "model": {"name": "schnet"}}))
    assert "was written by 'so3lib spice', not 'so3lib train'" in _err(capsys, ["train", "--config", str(cfg)])


def test_rank_deficient_reference_refused_in_one_line(capsys, tmp_path):
    err = _err(capsys, ["train", "--train", str(ETHANOL_TRAIN), "--out", str(tmp_path / "r"), "--max-steps", "1"])
    assert "per-element energy reference is not determined" in err and "rank 1 for 3 elements (H, C, O)" in err
    assert "--e0s average" in err and not (tmp_path / "r" / "checkpoints").exists()


def test_diverging_training_is_a_one_line_error_naming_its_step(capsys, tmp_path):
    argv = ["train", "--train", str(ETHANOL_TRAIN), "--out", str(tmp_path / "d"), "--e0s", "average"]
    argv += ["--n-atom-basis", "8", "--n-interactions", "1", "--max-steps", "30", "--batch-size", "8"]
    argv += ["--learning-rate", "1e9", "--warmup-steps", "0", "--schedule", "constant", "--grad-clip", "none"]
    argv += ["--log-every-steps", "1", "--eval-every-steps", "30", "--progress", "false"]
    err = _err(capsys, argv)
    assert re.search(r"non-finite training loss \((nan|inf)\) at step \d+ \(epoch \d+\): training stopped", err)
    assert "Lower the learning rate or check the data." in err and "internal error" not in err


def _mace_style_extxyz(path: Path, n: int = 60) -> None:
    """rMD17 ethanol frames written the way MACE users write their data: REF_energy / REF_forces."""
    import ase.io

    from so3lib import data

    ds = data.read(ETHANOL_TRAIN)
    frames = []
    for i in range(n):
        s = ds[i]
        atoms = s.to_ase()
        atoms.calc = None
        atoms.info["REF_energy"] = float(s.energy)
        atoms.arrays["REF_forces"] = np.asarray(s.forces)
        frames.append(atoms)
    ase.io.write(path, frames, format="extxyz")


def test_config_file_training_on_mace_style_labels_and_its_config_repeats_the_run(tmp_path, capsys):
    import json

    _mace_style_extxyz(tmp_path / "eth.extxyz")
    import ase.io
    from ase.calculators.singlepoint import SinglePointCalculator

    std = []  # a test file from another source, with ASE's own energy/forces labels
    for a in ase.io.read(tmp_path / "eth.extxyz", "50:60"):
        e, f = a.info.pop("REF_energy"), a.arrays.pop("REF_forces")
        a.calc = SinglePointCalculator(a, energy=e, forces=f)
        std.append(a)
    ase.io.write(tmp_path / "std.extxyz", std)
    (tmp_path / "cfg.yaml").write_text(
        "model: schnet\ntrain: eth.extxyz\nenergy_key: REF_energy\nforces_key: REF_forces\ne0s: average\n"
        "test: {path: std.extxyz, energy_key: energy, forces_key: forces}\n"
        "val_fraction: 0.2\nn_atom_basis: 8\nn_interactions: 1\nmax_steps: 20\nmax_epochs: null\nbatch_size: 8\n"
        "eval_every_steps: 10\nprogress: false\n"
    )
    import os

    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert main(["train", "--config", "cfg.yaml", "--out", "r1"]) == 0
        assert main(["train", "--config", "r1/config.yaml", "--out", "r2"]) == 0
    finally:
        os.chdir(cwd)
    a, b = (json.loads((tmp_path / r / "results.json").read_text()) for r in ("r1", "r2"))
    assert a["n_train"] == 48 and a["n_val"] == 12 and a["steps"] == 20 and a["test"]["n_structures"] == 10
    assert a["test"] == b["test"]
    assert a["val"] == b["val"] and a["train"] == b["train"] and a["energy_reference"] == b["energy_reference"]
    saved = yaml.safe_load((tmp_path / "r1" / "config.yaml").read_text())
    assert saved["command"]["name"] == "train" and saved["command"]["options"]["energy_key"] == "REF_energy"
    assert saved["data"]["energy_reference"] == "average" and "out" not in saved["command"]["options"]
    rows1 = (tmp_path / "r1" / "metrics.csv").read_text().splitlines()
    rows2 = (tmp_path / "r2" / "metrics.csv").read_text().splitlines()
    drop_time = lambda r: [x for i, x in enumerate(r.split(",")) if i != 2]  # noqa: E731  (column 2: wall time)
    assert [drop_time(r) for r in rows1] == [drop_time(r) for r in rows2]
    # the same file without keys fails loudly, naming the keys it saw
    capsys.readouterr()
    err = _err(capsys, ["train", "--train", str(tmp_path / "eth.extxyz"), "--e0s", "average"])
    assert "REF_energy" in err and "--energy-key" in err


def test_console_script_from_an_empty_folder_and_experiments_from_the_checkout(tmp_path):
    exe = Path(sys.executable).with_name("so3lib")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "so3lib"]
    r = subprocess.run(
        [*cmd, "inspect", str(SPICE_SAMPLE), "--json-only"], cwd=tmp_path, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    assert '"frames": 55' in r.stdout
    r = subprocess.run(
        [*cmd, "md", "--run", "nowhere", "--structure", "x", "--out", "o"], cwd=tmp_path, capture_output=True, text=True
    )
    assert (
        r.returncode == 2
        and r.stderr.strip()
        == "so3lib: error: nowhere: no such run folder (train one with so3lib train / md17 / spice)"
    )
    r = subprocess.run([sys.executable, "-m", "experiments.spice", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0 and "usage: so3lib spice" in r.stdout
