"""Research notebooks: each is committed with the outputs of its real run (``QUICK = False``, stored by
``scripts/run_notebooks.py``), reads as a document (at least 350 words of prose), and runs end to end in its QUICK
smoke mode in a fresh kernel. The tests execute a copy in memory and never write the committed notebook back."""

import os
import re
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = sorted((Path(__file__).parents[1] / "notebooks").glob("*.ipynb"))


MIN_WORDS = 350


def test_there_are_at_least_eight_notebooks_numbered_in_order():
    numbers = [p.name[:2] for p in NOTEBOOKS]
    assert len(numbers) >= 8 and numbers == [f"{k:02d}" for k in range(1, len(numbers) + 1)], numbers


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_a_document_with_the_outputs_of_its_real_run(path):
    """The committed notebook: its parameters cell says QUICK = False (the real run), every code cell was
    executed in order without errors, it shows figures, and its prose has at least MIN_WORDS words."""
    nb = nbformat.read(path, as_version=4)
    assert nb.cells[1].source.startswith("QUICK = False") and "parameters" in nb.cells[1].metadata.get("tags", [])
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1)), f"{path.name}: run it in order"
    _check_outputs(path, nb)
    words = sum(len(re.findall(r"[A-Za-z]{2,}", c.source)) for c in nb.cells if c.cell_type == "markdown")
    assert words >= MIN_WORDS, f"{path.name}: {words} words of prose"


# The quick smoke runs of the other notebooks take 0.5–2 minutes each on 2 cores (1 of the default tier's 8
# minutes per notebook): they run in the slow tier, beside the full runs; their committed outputs are checked here.
DEFAULT_TIER_QUICK_RUNS = ("01_quickstart",)


def _execute(path, tmp_path, monkeypatch, quick: bool, timeout_s: int):
    from nbclient import NotebookClient

    monkeypatch.setenv("SO3LIB_NOTEBOOK_RUNS", str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(path.parents[1]), os.environ.get("PYTHONPATH", "")]))
    nb = nbformat.read(path, as_version=4)
    if quick:  # the parameters cell, as papermill would inject it
        nb.cells[1].source = nb.cells[1].source.replace("QUICK = False", "QUICK = True", 1)
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

    if path.stem not in DEFAULT_TIER_QUICK_RUNS:
        test_runs_quick = pytest.mark.slow(test_runs_quick)

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
