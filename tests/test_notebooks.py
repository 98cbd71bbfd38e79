"""Research notebooks (issue #9): every notebook runs end to end in QUICK mode (nbclient, fresh kernel) and is
committed without outputs."""

import os
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = sorted((Path(__file__).parents[1] / "notebooks").glob("*.ipynb"))


def test_there_are_six_notebooks():
    assert [p.name[:2] for p in NOTEBOOKS] == ["01", "02", "03", "04", "05", "06"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_clean_and_quick_by_default(path):
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: commit without outputs"
    assert nb.cells[1].source.startswith("QUICK = True") and "parameters" in nb.cells[1].metadata.get("tags", [])


def _execute(path, tmp_path, monkeypatch, quick: bool, timeout_s: int):
    from nbclient import NotebookClient

    monkeypatch.setenv("SO3LIB_NOTEBOOK_RUNS", str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(path.parents[1]), os.environ.get("PYTHONPATH", "")]))
    nb = nbformat.read(path, as_version=4)
    if not quick:  # the parameters cell, as papermill would inject it
        nb.cells[1].source = nb.cells[1].source.replace("QUICK = True", "QUICK = False", 1)
    client = NotebookClient(
        nb, timeout=timeout_s, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    )
    client.execute()
    return nb


def _notebook_tests(path):
    """One class per notebook: pytest-xdist (--dist loadscope) schedules classes separately, so the notebooks
    spread over the workers."""

    def test_runs_quick(self, tmp_path, monkeypatch):
        """Executes end to end in its QUICK smoke mode (fresh kernel) and shows a picture."""
        _check_outputs(path, _execute(path, tmp_path, monkeypatch, quick=True, timeout_s=600))

    @pytest.mark.slow
    def test_full_run(self, tmp_path, monkeypatch):
        """The real run (QUICK = False): minutes to an hour on 2 CPU cores."""
        _check_outputs(path, _execute(path, tmp_path, monkeypatch, quick=False, timeout_s=4 * 3600))

    name = "TestNotebook_" + path.stem
    return name, type(name, (), {"test_runs_quick": test_runs_quick, "test_full_run": test_full_run})


for _path in NOTEBOOKS:
    _name, _cls = _notebook_tests(_path)
    globals()[_name] = _cls


def _check_outputs(path, nb):
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert images, f"{path.name} shows no picture"
