"""Locate the two samples shipped inside the package (the embedded default data)."""

from __future__ import annotations

from pathlib import Path

BUNDLED_DIR = Path(__file__).parent / "bundled"
RMD17_ETHANOL_TRAIN = "rmd17_ethanol_train_01.npz"
RMD17_ETHANOL_TEST = "rmd17_ethanol_test_01.npz"
SPICE_SAMPLE = "SPICE-1.1.4_n2.hdf5"


def bundled_path(name: str) -> Path:
    """Path of a bundled sample file; raises FileNotFoundError with the list of what is bundled."""
    p = BUNDLED_DIR / name
    if not p.exists():
        have = sorted(x.name for x in BUNDLED_DIR.iterdir() if x.suffix in (".npz", ".hdf5"))
        raise FileNotFoundError(f"{name} is not a bundled sample; bundled: {have}")
    return p
