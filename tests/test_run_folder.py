"""The run-folder contract: atomic writes, folders claimed with a marker (foreign files refused), one writer at
a time (a second process is refused at once, naming the holder), fingerprints that tell a changed run apart."""

import time

import numpy as np
import pytest
from conftest import ETHANOL_TEST
from hostile_files import holding_lock

from so3lib import data
from so3lib.models import make_config
from so3lib.training import DataConfig, RunConfig, TrainingConfig
from so3lib.training import run_folder as rf


def test_atomic_write_replaces_whole_files_and_leaves_no_temporary(tmp_path):
    p = rf.write_atomic(tmp_path / "sub" / "results.json", "old")
    rf.write_json_atomic(p, {"a": 1.5, "b": None})
    assert p.read_text() == '{\n  "a": 1.5,\n  "b": null\n}\n'
    assert sorted(x.name for x in p.parent.iterdir()) == ["results.json"]
    with pytest.raises(ValueError, match="Out of range float values are not JSON compliant"):
        rf.write_json_atomic(p, {"mae": float("nan")})  # never a silent NaN in a results file
    assert p.read_text().startswith('{\n  "a": 1.5')  # the old file is intact


def test_claim_refuses_folders_with_files_so3lib_did_not_write(tmp_path):
    new = rf.RunFolder(tmp_path / "new").claim()
    assert (new / rf.MARKER).exists()
    (tmp_path / "empty").mkdir()
    rf.RunFolder(tmp_path / "empty").claim()
    home = tmp_path / "project"
    home.mkdir()
    (home / "thesis.tex").write_text("x")
    with pytest.raises(rf.RunFolderError, match=r"project: holds files so3lib did not write \(thesis.tex\)"):
        rf.RunFolder(home).claim()
    assert (home / "thesis.tex").read_text() == "x" and not (home / rf.MARKER).exists()
    (tmp_path / "afile").write_text("x")
    with pytest.raises(rf.RunFolderError, match="afile: exists and is not a folder"):
        rf.RunFolder(tmp_path / "afile").claim()
    legacy = tmp_path / "legacy"  # a run of an so3lib version before the marker
    legacy.mkdir()
    (legacy / "config.yaml").write_text("name: r\nmodel:\n  name: schnet\n")
    rf.RunFolder(legacy).claim()
    assert (legacy / rf.MARKER).exists()


def test_a_second_process_is_refused_at_once_naming_the_holder(tmp_path):
    folder = tmp_path / "run"
    with holding_lock(folder) as pid:
        t0 = time.perf_counter()
        with pytest.raises(rf.RunFolderBusy, match=rf"run: in use by pid {pid} on .* since .*; wait for it"):
            with rf.RunFolder(folder).lock():
                pass
        assert time.perf_counter() - t0 < 2.0  # refused at once, not after a wait
    with rf.RunFolder(folder).lock():  # released when the holder dies
        assert (folder / rf.LOCK).read_text().startswith("pid ")


def _cfg(**training):
    return RunConfig(
        name="a",
        model=make_config("schnet", n_atom_basis=8, n_interactions=1),
        training=TrainingConfig(max_steps=10, max_epochs=None, **training),
        data=DataConfig(train="x.npz", energy_reference="average"),
    )


def test_fingerprints_tell_a_changed_run_apart_and_list_the_differences(tmp_path):
    ds = data.read(ETHANOL_TEST).subset(np.arange(30))
    tr, va = ds.subset(np.arange(20)), ds.subset(np.arange(20, 30))
    fp = rf.fingerprint(_cfg(), {"train": tr, "val": va, "test": None})
    assert fp == rf.fingerprint(_cfg(), {"train": tr, "val": va})  # deterministic
    assert fp["data"]["train"]["frames"] == 20 and fp["data"]["train"]["atoms"] == 180
    rf.save_fingerprint(tmp_path, fp)
    rf.check_resume(tmp_path, fp)  # the same run: accepted
    # budget and logging may change on resume; the run name and the data's path do not matter
    same = _cfg(log_every_steps=5).model_copy(update={"name": "b"})
    same.training.max_steps = 99
    rf.check_resume(tmp_path, rf.fingerprint(same, {"train": tr, "val": va}))
    changed = tr.subset(np.arange(19))
    with pytest.raises(rf.RunFolderError) as e:
        rf.check_resume(tmp_path, rf.fingerprint(_cfg(learning_rate=0.01), {"train": changed, "val": va}))
    msg = str(e.value)
    assert "--resume refuses a changed run (" in msg and "config.training.learning_rate: 0.001 → 0.01" in msg
    assert "data.train: content changed (20 → 19 frames)" in msg and "data.val" not in msg
    shifted = data.Dataset.from_arrays(
        source="s",
        numbers=tr.numbers[:9],
        positions=tr.positions.reshape(20, 9, 3),
        energy=tr.energy + 1e-9,
        forces=tr.forces.reshape(20, 9, 3),
    )
    assert rf.differences(fp["data"], rf.fingerprint(_cfg(), {"train": shifted, "val": va})["data"]) == [
        "train: content changed (20 → 20 frames)"
    ]
