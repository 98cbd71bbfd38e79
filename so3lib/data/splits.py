"""Train/validation/test splits: random with a seed, by molecule, and the rMD17 protocol. Indices are
plain int arrays, saved to and loaded from ``splits.npz`` so a run can be reproduced."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from so3lib.data.errors import DataError


def _sizes(n: int, fractions: Sequence[float]) -> list[int]:
    if any(f < 0 for f in fractions) or sum(fractions) > 1 + 1e-9:
        raise ValueError(f"split fractions {list(fractions)} must be non-negative and sum to at most 1")
    sizes = [int(round(f * n)) for f in fractions]
    if sum(sizes) > n:
        sizes[-1] -= sum(sizes) - n
    return sizes


def random_split(
    n_frames: int,
    fractions: Sequence[float] = (0.95, 0.05),
    seed: int = 0,
    names: Sequence[str] = ("train", "val", "test"),
) -> dict[str, np.ndarray]:
    """Random disjoint splits of ``range(n_frames)`` with the given fractions (the remainder goes unused
    when they sum to < 1)."""
    perm = np.random.default_rng(seed).permutation(n_frames)
    out, start = {}, 0
    for name, size in zip(names, _sizes(n_frames, fractions)):
        out[name] = np.sort(perm[start : start + size])
        start += size
    return out


def count_split(n_frames: int, counts: Mapping[str, int], seed: int = 0) -> dict[str, np.ndarray]:
    """Random disjoint splits with exact frame counts, e.g. the rMD17 protocol {'train': 950, 'val': 50}."""
    if sum(counts.values()) > n_frames:
        raise ValueError(f"split counts {dict(counts)} need {sum(counts.values())} frames, only {n_frames} exist")
    perm = np.random.default_rng(seed).permutation(n_frames)
    out, start = {}, 0
    for name, c in counts.items():
        out[name] = np.sort(perm[start : start + c])
        start += c
    return out


def split_by_group(
    groups: Sequence[str] | np.ndarray,
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    names: Sequence[str] = ("train", "val", "test"),
) -> dict[str, np.ndarray]:
    """Split frames so that every group (molecule) lies in exactly one split. Fractions count molecules."""
    _, rank = np.unique(np.asarray(groups).astype(str), return_inverse=True)
    return split_by_group_rank(rank.reshape(-1), fractions, seed, names)


def split_by_group_rank(
    rank: np.ndarray,
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    names: Sequence[str] = ("train", "val", "test"),
) -> dict[str, np.ndarray]:
    """`split_by_group` with each frame's group given by the rank of its name among the sorted names (an int
    array: a store's frames need no per-frame strings): the same splits."""
    rank = np.asarray(rank)
    uniq = np.unique(rank)
    if len(uniq) < sum(1 for f in fractions if f > 0):
        raise DataError("<split>", f"only {len(uniq)} molecules for {len(fractions)} splits by molecule")
    perm = np.random.default_rng(seed).permutation(len(uniq))
    sizes = _sizes(len(uniq), fractions)
    if abs(sum(fractions) - 1.0) < 1e-9:  # fractions cover everything: rounding leftovers go to the first split
        sizes[0] += len(uniq) - sum(sizes)
    for i, (f, s) in enumerate(zip(fractions, sizes)):  # every non-empty split gets at least one molecule
        if f > 0 and s == 0:
            donor = int(np.argmax(sizes))
            sizes[donor] -= 1
            sizes[i] = 1
    out, start = {}, 0
    for name, size in zip(names, sizes):
        chosen = uniq[perm[start : start + size]]
        out[name] = np.nonzero(np.isin(rank, chosen))[0]
        start += size
    return out


def save_splits(path: str | Path, splits: Mapping[str, np.ndarray], **info) -> None:
    np.savez(
        path,
        **{k: np.asarray(v, np.int64) for k, v in splits.items()},
        **{f"info_{k}": np.asarray(str(v)) for k, v in info.items()},
    )


def load_splits(path: str | Path) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return {k: z[k] for k in z.files if not k.startswith("info_")}
