"""Regenerate ``tests/data/``: small slices of the real reference data the default test run reads.

usage: python scripts/make_test_data.py [--shared ../shared/data] [--out tests/data]

Every slice keeps the source file's own format and keys (so the readers are tested on the real layout) and takes
frames in their stored order, so a slice is reproducible from the full file and says which frames it holds:

- rMD17 (CC0): the first ``RMD17_FRAMES`` frames of split 01, train and test, for all ten molecules (ethanol's
  full split 01 is also bundled in the package, ``so3lib/data/bundled``, for the 950/50 protocol).
- original MD17 ethanol (MIT, via mlff): frames 0–1049, enough for the 1000 + test-frame protocol.
- mlearn Li (BSD-3): the whole test file (29 cells) and every 6th structure of the training file.
- ACEpotentials TiAl (MIT): the first 40 frames.

The SPICE 1.1.4 sample is bundled in the package and is not copied here.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np

from so3lib.workflows.md17 import MOLECULES as RMD17_MOLECULES

ROOT = Path(__file__).resolve().parents[1]
RMD17_FRAMES = 50
MD17_FRAMES = 1050
LI_TRAIN_STRIDE = 6
TIAL_FRAMES = 40


def _slice_npz(src: Path, dst: Path, n_frames: int, per_frame_keys: tuple[str, ...]) -> None:
    raw = np.load(src)
    out = {k: (raw[k][:n_frames] if k in per_frame_keys else raw[k]) for k in raw.files}
    dst.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(dst, **out)


def _first_xyz_frames(src: Path, dst: Path, n_frames: int) -> None:
    """Copy the first frames of an extended-XYZ file verbatim (line by line, no re-serialisation)."""
    lines = src.read_text().splitlines(keepends=True)
    out, i = [], 0
    for _ in range(n_frames):
        n = int(lines[i])
        out += lines[i : i + n + 2]
        i += n + 2
    dst.write_text("".join(out))


def make(shared: Path, out: Path) -> list[Path]:
    written = []
    for mol in RMD17_MOLECULES:
        for part in ("train", "test"):
            dst = out / "rmd17" / f"rmd17_{mol}_{part}_01.npz"
            _slice_npz(
                shared / "rmd17" / f"rmd17_{mol}_{part}_01.npz",
                dst,
                RMD17_FRAMES,
                ("coords", "energies", "forces", "old_indices", "old_energies", "old_forces"),
            )
            written.append(dst)
    shutil.copy(shared / "rmd17" / "LICENSE", out / "rmd17" / "LICENSE")

    dst = out / "md17" / f"md17_ethanol_first{MD17_FRAMES}.npz"
    _slice_npz(shared / "md17" / "md17_ethanol_first2000.npz", dst, MD17_FRAMES, ("R", "E", "F"))
    written.append(dst)

    (out / "materials").mkdir(parents=True, exist_ok=True)
    shutil.copy(shared / "materials" / "li_mlearn_test.json", out / "materials" / "li_mlearn_test.json")
    entries = json.loads((shared / "materials" / "li_mlearn_training.json").read_text())
    dst = out / "materials" / "li_mlearn_training_every6.json"
    dst.write_text(json.dumps(entries[::LI_TRAIN_STRIDE]))
    written += [out / "materials" / "li_mlearn_test.json", dst]
    dst = out / "materials" / f"tial_first{TIAL_FRAMES}.xyz"
    _first_xyz_frames(shared / "materials" / "tial_tutorial.xyz", dst, TIAL_FRAMES)
    written.append(dst)
    for lic in ("LICENSE-mlearn", "LICENSE-acepotentials"):
        shutil.copy(shared / "materials" / lic, out / "materials" / lic)
    return written


def main(argv=None) -> list[Path]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "data", help="the full reference data")
    ap.add_argument("--out", type=Path, default=ROOT / "tests" / "data")
    a = ap.parse_args(argv)
    written = make(a.shared, a.out)
    total = sum(p.stat().st_size for p in a.out.rglob("*") if p.is_file())
    print(f"wrote {len(written)} data files under {a.out} ({total / 1e6:.2f} MB with licences)")
    return written


if __name__ == "__main__":
    main()
