"""mkdocs hook: serve files that live outside ``docs/`` as pages, unchanged in the repository.

- ``notebooks/*.ipynb`` become ``notebooks/<name>/`` (rendered by mkdocs-jupyter, not executed);
- ``benchmarks/results/*.png`` are copied, so ``docs/results.md``'s ``../benchmarks/results/...`` images resolve.

A new notebook is picked up by itself; add it to the Notebooks section of ``mkdocs.yml`` to list it in the nav.
"""

from __future__ import annotations

from pathlib import Path

from mkdocs.plugins import event_priority
from mkdocs.structure.files import File, InclusionLevel

ROOT = Path(__file__).resolve().parents[2]


@event_priority(100)  # before mkdocs-jupyter looks for notebooks among the files
def on_files(files, config):
    for nb in sorted((ROOT / "notebooks").glob("*.ipynb")):
        files.append(File(f"notebooks/{nb.name}", str(ROOT), config["site_dir"], config["use_directory_urls"]))
    for png in sorted((ROOT / "benchmarks" / "results").glob("*.png")):
        f = File(f"../benchmarks/results/{png.name}", config["docs_dir"], config["site_dir"], False)
        f.dest_uri = f"benchmarks/results/{png.name}"  # inside the site, where the page's link is rewritten to
        f.inclusion = InclusionLevel.INCLUDED
        files.append(f)
    return files
