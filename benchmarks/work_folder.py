"""The scratch folder of a benchmark run: made by the benchmark, marked, and only ever emptied when marked.

so3lib never deletes what it did not create: a ``--work`` folder that exists, is not empty and carries no
marker (someone else's folder, or a typo pointing at one) is refused with a one-line error instead of wiped.
"""

from __future__ import annotations

import shutil
from pathlib import Path

MARKER = ".so3lib-benchmark-work"


def fresh_work_folder(path: str | Path) -> Path:
    """An empty folder at ``path`` owned by this benchmark: one it made earlier (marker) is emptied, a missing
    or empty one is made and marked, anything else raises ``SystemExit`` naming the folder."""
    p = Path(path)
    if p.exists() or p.is_symlink():
        real_dir = p.is_dir() and not p.is_symlink()
        if real_dir and (p / MARKER).is_file():
            shutil.rmtree(p)
        elif real_dir and not any(p.iterdir()):
            p.rmdir()
        else:
            raise SystemExit(
                f"so3lib: error: --work {p} exists and was not made by a so3lib benchmark (no {MARKER} in it); "
                "name a new or empty folder"
            )
    p.mkdir(parents=True)
    (p / MARKER).write_text("scratch folder of a so3lib benchmark: emptied by the next run\n")
    return p
