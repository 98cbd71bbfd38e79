"""Resumable, checksummed downloads of the public datasets (real addresses; no network here, so the logic is
tested offline against a local HTTP server).

    download(RMD17, "data/")          # rMD17 archive (figshare article 12672038), md5 from the figshare API
    download(SPICE["2.0.1"], "data/") # Zenodo record 10975225
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

CHUNK = 1 << 20


@dataclasses.dataclass(frozen=True)
class Remote:
    filename: str
    urls: tuple[str, ...]
    md5: str | None = None
    md5_api: str | None = None  # JSON endpoint listing {files: [{name, computed_md5}]} (figshare)
    description: str = ""


RMD17 = Remote(
    filename="rmd17.tar.bz2",
    urls=(
        "https://figshare.com/ndownloader/files/23950376",
        "https://archive.materialscloud.org/record/file?filename=rmd17.tar.bz2&record_id=466",
    ),
    md5_api="https://api.figshare.com/v2/articles/12672038",
    description="revised MD17 (Christensen & von Lilienfeld 2020), figshare article 12672038, CC0",
)

SPICE = {
    "1.1.4": Remote(
        "SPICE-1.1.4.hdf5",
        ("https://zenodo.org/records/8222043/files/SPICE-1.1.4.hdf5?download=1",),
        md5="f27d4c81da0e37d6547276bf6b4ae6a1",
        description="SPICE 1.1.4, Zenodo record 8222043",
    ),
    "2.0.1": Remote(
        "SPICE-2.0.1.hdf5",
        ("https://zenodo.org/records/10975225/files/SPICE-2.0.1.hdf5?download=1",),
        md5="bfba2224b6540e1390a579569b475510",
        description="SPICE 2.0.1, Zenodo record 10975225",
    ),
}


def md5sum(path: str | os.PathLike) -> str:
    h = hashlib.md5()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def md5_from_api(remote: Remote, timeout: float = 30.0) -> str | None:
    """The published md5 of ``remote.filename`` from its JSON API (None when unreachable or not listed)."""
    if not remote.md5_api:
        return None
    try:
        with urllib.request.urlopen(remote.md5_api, timeout=timeout) as r:
            meta = json.load(r)
    except (urllib.error.URLError, OSError, ValueError):
        return None
    for f in meta.get("files", []):
        if f.get("name") == remote.filename:
            return f.get("computed_md5") or f.get("supplied_md5")
    return None


def _fetch(url: str, part: Path, timeout: float, progress: bool) -> None:
    """Append to ``part`` from its current size (HTTP Range); restart if the server ignores the range."""
    from tqdm.auto import tqdm

    have = part.stat().st_size if part.exists() else 0
    req = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416:  # range not satisfiable: the part file is already complete
            return
        raise
    with resp:
        status = getattr(resp, "status", 200)
        mode = "ab" if have and status == 206 else "wb"
        if mode == "wb":
            have = 0
        total = resp.headers.get("Content-Length")
        total = int(total) + have if total is not None else None
        with (
            open(part, mode) as fh,
            tqdm(total=total, initial=have, unit="B", unit_scale=True, desc=part.name, disable=not progress) as bar,
        ):
            for block in iter(lambda: resp.read(CHUNK), b""):
                fh.write(block)
                bar.update(len(block))


def download(
    remote: Remote,
    dest_dir: str | os.PathLike,
    md5: str | None = None,
    timeout: float = 60.0,
    progress: bool = True,
    urls: Sequence[str] | None = None,
    log: Callable[[str], None] = print,
) -> Path:
    """Download ``remote`` into ``dest_dir``, resuming a ``.part`` file, trying the mirrors in order, and verify
    the md5 (given, built in, or published by the API). Returns the final path; raises on a checksum mismatch
    (the bad file is kept as ``.part`` for inspection and removed on the next try)."""
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    final = dest / remote.filename
    expected = md5 or remote.md5 or md5_from_api(remote)
    if final.exists():
        if expected is None or md5sum(final) == expected:
            log(f"{final} already present" + (" (md5 verified)" if expected else ""))
            return final
        log(f"{final} exists but its md5 differs from {expected}: downloading again")
        final.unlink()
    part = final.with_name(final.name + ".part")
    errors = []
    for url in urls or remote.urls:
        try:
            _fetch(url, part, timeout, progress)
            break
        except (urllib.error.URLError, OSError) as exc:
            errors.append(f"{url}: {exc}")
            log(f"download from {url} failed ({exc}); trying the next address")
    else:
        raise ConnectionError(
            f"could not download {remote.filename}; partial data kept in {part} for resuming:\n" + "\n".join(errors)
        )
    got = md5sum(part)
    if expected is not None and got != expected:
        part.unlink()
        raise ValueError(
            f"{remote.filename}: md5 {got} does not match the published {expected}; the file was "
            "removed, run again to re-download"
        )
    part.rename(final)
    log(f"saved {final} (md5 {got}{', verified' if expected else ', no published checksum to compare'})")
    return final
