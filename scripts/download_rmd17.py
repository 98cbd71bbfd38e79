"""Download and unpack the full rMD17 archive (figshare article 12672038, file rmd17.tar.bz2, CC0).

usage: python scripts/download_rmd17.py [--dest data] [--md5 HEX] [--no-extract]

Resumes a partial download (``.part`` file), tries the Materials Cloud mirror if figshare fails, and verifies
the md5 (``--md5``, else the one the figshare API publishes). Unpacked layout, read by
``python -m experiments.md17 --data-dir data/rmd17``:
    data/rmd17/npz_data/rmd17_<molecule>.npz, data/rmd17/splits/index_{train,test}_0X.csv
"""

from __future__ import annotations

import argparse
import tarfile
from pathlib import Path

from so3lib.data.download import RMD17, download


def main(argv=None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dest", default="data")
    ap.add_argument("--md5", default=None, help="expected md5 (default: published by the figshare API)")
    ap.add_argument("--no-extract", action="store_true")
    ap.add_argument("--url", action="append", help="override the download address(es)")
    a = ap.parse_args(argv)
    path = download(RMD17, a.dest, md5=a.md5, urls=a.url)
    if not a.no_extract:
        with tarfile.open(path, "r:bz2") as tar:
            tar.extractall(a.dest, filter="data")
        print(f"extracted to {Path(a.dest) / 'rmd17'}")
    return path


if __name__ == "__main__":
    main()
