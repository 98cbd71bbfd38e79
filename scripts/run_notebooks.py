"""Execute the research notebooks in their real mode (``QUICK = False``) and store the outputs in the notebooks,
so a reader on GitHub or on the documentation site sees the figures and tables without running anything.

usage: python scripts/run_notebooks.py [notebooks/05_md_stability.ipynb ...]   (default: every notebook)

Each notebook runs in a fresh kernel from the ``notebooks/`` folder; its runs go to ``runs/notebooks/`` (or
``$SO3LIB_NOTEBOOK_RUNS``). The tests execute the same notebooks with ``QUICK = True`` in memory and never
write them back.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]


def execute_in_place(path: Path, timeout_s: int = 4 * 3600) -> float:
    """Run ``path`` as committed (its parameters cell must say ``QUICK = False``) and write the outputs back."""
    nb = nbformat.read(path, as_version=4)
    if not nb.cells[1].source.startswith("QUICK = False"):
        raise SystemExit(f"{path}: the parameters cell must start with 'QUICK = False' (the real run)")
    t0 = time.perf_counter()
    NotebookClient(
        nb, timeout=timeout_s, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    ).execute()
    nbformat.write(nb, path)
    return time.perf_counter() - t0


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("notebooks", nargs="*", type=Path)
    paths = ap.parse_args(argv).notebooks or sorted((ROOT / "notebooks").glob("*.ipynb"))
    for p in paths:
        print(f"{p.name}: {execute_in_place(p.resolve()):.0f} s", flush=True)


if __name__ == "__main__":
    main()
