"""Active learning on ethanol with GFN2-xTB (tblite) as the oracle: uncertainty selection against random
selection of the same number of frames from the same ensemble MD, error against the oracle on an independent
600 K oracle-MD test set per round. Runs ``so3lib active`` and copies its active_learning.json/.png to
benchmarks/results/.

usage: python benchmarks/active_learning.py [extra so3lib active flags]
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from so3lib.cli import main  # noqa: E402

ARGS = [
    "--structure", str(ROOT / "so3lib" / "data" / "bundled" / "rmd17_ethanol_test_01.npz"),
    "--oracle", "gfn2-xtb",
    "--rounds", "2", "--n-select", "10", "--n-initial", "10", "--n-val", "10", "--n-test", "50",
    "--initial-temperature", "300", "--temperature", "600", "--md-steps", "400", "--save-every", "10",
    "--ensemble", "3", "--model", "schnet", "--n-atom-basis", "16", "--n-interactions", "2",
    "--max-steps", "150", "--eval-every-steps", "75",
]  # fmt: skip

if __name__ == "__main__":
    work = Path(tempfile.mkdtemp(prefix="so3lib_al_")) / "al"
    code = main(["active", *ARGS, *sys.argv[1:], "--out", str(work), "--no-progress"])
    if code == 0:
        for f in ("active_learning.json", "active_learning.png"):
            shutil.copy(work / f, ROOT / "benchmarks" / "results" / f)
    sys.exit(code)
