"""The run-folder contract every command keeps:

- **one writer**: an exclusive lock (``.so3lib.lock``, `fcntl.flock`) held while a command writes a folder; a
  second process on the same folder is refused at once, naming the holder;
- **nothing deleted or overwritten that so3lib did not create**: a folder is claimed with a marker
  (``.so3lib-run``); one that holds other files is refused;
- **atomic writes** of config, metrics summaries and results (a temporary file renamed into place);
- **fingerprints** of the configuration and of the data (content hashes of every split), saved as
  ``fingerprint.json``; a resumed run must match them, and the differences are listed when it does not.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import socket
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

MARKER = ".so3lib-run"
LOCK = ".so3lib.lock"
FINGERPRINT = "fingerprint.json"
# options a resumed run may change: how long and how verbosely it goes, and how its batches are spread (a new
# batch size continues from the saved position, starting the next epoch if that position is past its end)
RESUMABLE = frozenset(
    {
        "max_steps",
        "max_epochs",
        "max_minutes",
        "log_every_steps",
        "checkpoint_every_steps",
        "batch_size",
        "eval_batch_size",
        "n_devices",
    }
)


class RunFolderError(ValueError):
    """A run folder that cannot be used as asked (busy, foreign files, a changed run on --resume)."""


class RunFolderBusy(RunFolderError):
    """Another process holds the folder's lock."""


# --------------------------------------------------------------------------------------------- writing
def write_atomic(path: str | Path, content: str | bytes) -> Path:
    """Write ``content`` to ``path`` through a temporary file in the same folder and `os.replace`, so a reader
    (or a crash) never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    data = content.encode() if isinstance(content, str) else content
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


def write_json_atomic(path: str | Path, obj: Any) -> Path:
    return write_atomic(path, json.dumps(obj, indent=2, default=_json_default, allow_nan=False) + "\n")


def to_json(obj: Any) -> str:
    """JSON of a results mapping, a value that could not be computed (NaN, inf) written as null (absent)."""
    return json.dumps(_finite(obj), indent=2, default=_json_default, allow_nan=False) + "\n"


def _finite(o):
    if isinstance(o, float | np.floating):
        return float(o) if np.isfinite(o) else None
    if isinstance(o, Mapping):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, list | tuple):
        return [_finite(v) for v in o]
    if isinstance(o, np.ndarray):
        return _finite(o.tolist())
    return o


def _json_default(o):
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return None if not np.isfinite(o) else float(o)
    if isinstance(o, (np.ndarray, tuple, set)):
        return list(o)
    return str(o)


# --------------------------------------------------------------------------------------------- the folder
class RunFolder:
    """A folder so3lib writes: ``claim`` it, hold its ``lock`` while writing."""

    def __init__(self, path: str | Path, kind: str = "run"):
        self.path = Path(path)
        self.kind = kind

    def is_ours(self) -> bool:
        """Made by so3lib: the marker, or (runs of so3lib versions before the marker) a config.yaml naming a model."""
        if (self.path / MARKER).exists():
            return True
        cfg = self.path / "config.yaml"
        return cfg.exists() and "model:" in cfg.read_text(errors="replace")[:4000]

    def claim(self) -> Path:
        """Create the folder, or accept an existing one so3lib made (or an empty one); refuse one that holds
        files so3lib did not write."""
        p = self.path
        if p.exists() and not p.is_dir():
            raise RunFolderError(f"{p}: exists and is not a folder; choose another output folder")
        if p.exists() and any(p.iterdir()) and not self.is_ours():
            names = sorted(x.name for x in p.iterdir())
            shown = ", ".join(names[:5]) + (", …" if len(names) > 5 else "")
            raise RunFolderError(
                f"{p}: holds files so3lib did not write ({shown}); so3lib writes only into new, empty or its own "
                f"{self.kind} folders: choose another output folder"
            )
        p.mkdir(parents=True, exist_ok=True)
        if not (p / MARKER).exists():
            write_json_atomic(p / MARKER, {"created_by": "so3lib", "kind": self.kind, "created": _now()})
        return p

    @contextlib.contextmanager
    def lock(self) -> Iterator[RunFolder]:
        """Hold the folder's exclusive lock (claiming it first); `RunFolderBusy` if another process holds it."""
        import fcntl

        self.claim()
        fh = open(self.path / LOCK, "a+")
        try:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                fh.seek(0)
                holder = fh.read().strip() or "another process"
                raise RunFolderBusy(
                    f"{self.path}: in use by {holder}; wait for it to finish or choose another output folder"
                ) from None
            fh.seek(0)
            fh.truncate()
            cmd = " ".join(Path(sys.argv[0]).name.split() + sys.argv[1:])[:300]
            fh.write(f"pid {os.getpid()} on {socket.gethostname()} since {_now()} ({cmd})")
            fh.flush()
            yield self
        finally:
            with contextlib.suppress(OSError):
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
            fh.close()


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


# --------------------------------------------------------------------------------------------- fingerprints
def _sha(*arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        if a is None:
            h.update(b"none")
            continue
        a = np.ascontiguousarray(np.asarray(a))
        h.update(str(a.dtype).encode() + str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def fingerprint_dataset(ds) -> dict[str, Any]:
    """Frames, atoms and a content hash of a split: every array of a `Dataset`; for a store's `DatasetView`,
    the frames it selects with their atom counts and energies (cheap for millions of frames)."""
    from so3lib.data.dataset import Dataset

    if isinstance(ds, Dataset):
        digest = _sha(ds.numbers, ds.positions, ds.energy, ds.forces, ds.stress, ds.cell, ds.pbc, ds.offsets)
        return {"frames": len(ds), "atoms": int(np.sum(ds.n_atoms)), "sha256": digest}
    return {"frames": len(ds), "atoms": sum(int(np.sum(p.n_atoms)) for p in ds.chunks()), "sha256": _sha_view(ds)}


def _sha_view(view) -> str:
    """``_sha(source, frames, n_atoms, energy)`` of a store's view, its arrays read chunk by chunk (the same
    digest, without per-frame arrays of the whole view)."""
    h = hashlib.sha256()
    source = np.frombuffer(str(view.source).encode(), np.uint8)
    h.update(str(source.dtype).encode() + str(source.shape).encode() + source.tobytes())
    for dtype, read in (
        (np.int64, lambda p: p.frames),
        (np.int64, lambda p: p.n_atoms),
        (np.float64, lambda p: p.energy),
    ):
        h.update(str(np.dtype(dtype)).encode() + str((len(view),)).encode())
        for part in view.chunks():
            h.update(np.ascontiguousarray(read(part), dtype).tobytes())
    return h.hexdigest()[:16]


def fingerprint(cfg, datasets: Mapping[str, Any], resumable: frozenset[str] = RESUMABLE) -> dict[str, Any]:
    """What makes a run the same run: the configuration (without the run name, the data's file paths and the
    ``resumable`` training options: budget and logging cadence, which a resumed run may change) and every
    split's content."""
    c = cfg.model_dump(mode="json")
    c.pop("name", None)
    c.pop("command", None)  # how it was asked for; what it computes is in model, training, data
    c["training"] = {k: v for k, v in c.get("training", {}).items() if k not in resumable}
    if c.get("data"):
        c["data"] = {k: v for k, v in c["data"].items() if k not in ("train", "val", "test")}
    return {"config": c, "data": {k: fingerprint_dataset(v) for k, v in datasets.items() if v is not None}}


def differences(saved: Mapping, now: Mapping, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ, as 'key: old → new' (a split's data as a changed hash and counts)."""
    out = []
    for k in sorted(set(saved) | set(now), key=str):
        a, b = saved.get(k, "<absent>"), now.get(k, "<absent>")
        key = f"{prefix}{k}"
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            if a != b and "sha256" in a:
                out.append(f"{key}: content changed ({a.get('frames')} → {b.get('frames')} frames)")
            else:
                out.extend(differences(a, b, key + "."))
        elif a != b:
            out.append(f"{key}: {a} → {b}")
    return out


def check_resume(folder: str | Path, fp: Mapping) -> None:
    """Raise `RunFolderError` listing the differences when ``fp`` is not the fingerprint saved in ``folder``."""
    path = Path(folder) / FINGERPRINT
    if not path.exists():
        return
    saved = json.loads(path.read_text())
    diff = differences(saved, json.loads(json.dumps(fp, default=_json_default)))
    if diff:
        shown = "; ".join(diff[:8]) + (f"; and {len(diff) - 8} more" if len(diff) > 8 else "")
        raise RunFolderError(
            f"{folder}: --resume refuses a changed run ({shown}); resume with the run's own options and data "
            "(so3lib <command> --config RUN/config.yaml --resume), or train into a new folder"
        )


def save_fingerprint(folder: str | Path, fp: Mapping) -> Path:
    return write_json_atomic(Path(folder) / FINGERPRINT, fp)


def matches(path: str | Path, fp: Mapping) -> bool:
    """Whether the fingerprint saved at ``path`` equals ``fp`` (for sweeps: a finished point still valid)."""
    path = Path(path)
    if not path.exists():
        return False
    return not differences(json.loads(path.read_text()), json.loads(json.dumps(fp, default=_json_default)))
