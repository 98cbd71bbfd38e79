"""The benchmarks' scratch folders: a --work folder someone else made is refused, never wiped."""

import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "work_folder", Path(__file__).resolve().parents[1] / "benchmarks" / "work_folder.py"
)
wf = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(wf)


def test_a_foreign_folder_is_refused_and_left_whole(tmp_path):
    theirs = tmp_path / "results"
    theirs.mkdir()
    (theirs / "thesis.tex").write_text("months of work")
    with pytest.raises(SystemExit) as e:
        wf.fresh_work_folder(theirs)
    assert str(e.value).startswith(f"so3lib: error: --work {theirs} exists and was not made by a so3lib benchmark")
    assert (theirs / "thesis.tex").read_text() == "months of work"


def test_a_file_or_a_link_is_refused(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("keep")
    link = tmp_path / "link"
    link.symlink_to(tmp_path)
    for p in (f, link):
        with pytest.raises(SystemExit, match="was not made by a so3lib benchmark"):
            wf.fresh_work_folder(p)
    assert f.read_text() == "keep" and link.is_symlink()


def test_its_own_folder_is_emptied_and_a_new_or_empty_one_claimed(tmp_path):
    own = wf.fresh_work_folder(tmp_path / "a" / "work")
    assert (own / wf.MARKER).is_file()
    (own / "run").mkdir()
    (own / "run" / "old.json").write_text("{}")
    again = wf.fresh_work_folder(own)
    assert sorted(p.name for p in again.iterdir()) == [wf.MARKER]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (wf.fresh_work_folder(empty) / wf.MARKER).is_file()
