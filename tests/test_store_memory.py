"""A store's split costs its frame index and nothing more per frame (issue #20): the reductions over a view
(species, energy reference fit, its diagnostics, the run fingerprint, the per-batch reference energies) read
the memory map chunk by chunk, so the heap they need is the same for 2·10⁴ and 8·10⁴ conformations; chunked,
they equal the reductions over the whole view at once. The test predictions kept for parity plots are
bounded too."""

from __future__ import annotations

import json
import tracemalloc

import numpy as np
import pytest

import so3lib.data as d
from so3lib.data import store as store_mod
from so3lib.training import run_folder

SPECIES = (1, 6, 8)
MOLECULES = np.array([[2, 0, 1], [4, 1, 0], [2, 1, 1], [0, 0, 2], [6, 2, 0]], np.int16)  # H2O CH4 CH2O O2 C2H6


def synthetic_store(folder, n_frames: int):
    """A packed store of ``n_frames`` conformations of five small molecules (energies from a known per-element
    reference plus noise); positions and forces are sparse files of zeros (the reductions never read them)."""
    rng = np.random.default_rng(0)
    folder.mkdir()
    kind = rng.integers(0, len(MOLECULES), n_frames)
    comp = MOLECULES[kind]
    n_at = comp.sum(axis=1).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(n_at)]).astype(np.int64)
    energy = comp @ np.array([-13.6, -1029.0, -2041.0]) + rng.normal(0, 0.05, n_frames)
    energy[::97] = np.nan  # some unlabelled frames
    n_atoms = int(offsets[-1])
    numbers = np.concatenate([np.repeat(SPECIES, c) for c in MOLECULES])  # not per frame: never read here
    np.resize(numbers.astype(np.int8), n_atoms).tofile(folder / "numbers.bin")
    for name in ("positions", "forces"):
        with open(folder / f"{name}.bin", "wb") as fh:
            fh.truncate(n_atoms * 3 * 8)
    offsets.tofile(folder / "offsets.bin")
    energy.tofile(folder / "energy.bin")
    kind.astype(np.int32).tofile(folder / "molecule.bin")
    np.arange(n_frames, dtype=np.int32).tofile(folder / "frame.bin")
    comp.tofile(folder / "composition.bin")
    mols = [{"name": f"m{i}", "smiles": "", "subset": "s", "conformers": 0} for i in range(len(MOLECULES))]
    manifest = {"fingerprint": {"source": "synthetic", "version": 2}, "frames": n_frames, "atoms": n_atoms}
    manifest.update(species=list(SPECIES), molecules=mols)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return store_mod.open_store(folder)


def reductions(view) -> list:
    """Everything training computes over a whole split before its first step."""
    out = [view.species]
    for method in ("lstsq", "lstsq+intercept", "average"):
        out.append(d.fit_energy_reference(view, method=method))
    out.append(run_folder.fingerprint_dataset(view))
    offset = out[1].energy(view.subset(np.arange(0, len(view), 997)))  # what the loader asks per batch
    return [*out, offset]


def traced_peak(fn) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_chunked_reductions_equal_the_whole_view(tmp_path, monkeypatch):
    """Chunks of 7 frames against one chunk holding the whole view: the same references (to rounding), the
    same fingerprint (the digest is built from the same bytes in order) and the same reference energies."""
    view = synthetic_store(tmp_path / "s", 1000)
    split = view.subset(np.sort(np.random.default_rng(1).choice(1000, 700, replace=False)))
    whole = reductions(split)
    monkeypatch.setattr(store_mod, "CHUNK_FRAMES", 7)
    chunked = reductions(split)
    assert chunked[0] == whole[0] == list(SPECIES) and chunked[4] == whole[4]
    for a, b in zip(chunked[1:4], whole[1:4]):
        assert a.method == b.method and a.determined and b.determined
        np.testing.assert_allclose(a.energies_ev + (a.intercept_ev,), b.energies_ev + (b.intercept_ev,), rtol=1e-9)
        for k in ("residual_std_per_atom_ev", "residual_mae_per_atom_ev", "raw_std_per_atom_ev"):
            np.testing.assert_allclose(getattr(a, k), getattr(b, k), rtol=1e-9)
    np.testing.assert_allclose(chunked[5], whole[5], rtol=1e-12)
    # the reference recovers the per-element energies the store was made with (the noise averages out), and
    # its diagnostic is the standard deviation of (E − A·e)/N over the labelled frames
    ref = whole[1]
    np.testing.assert_allclose(ref.energies_ev, [-13.6, -1029.0, -2041.0], atol=0.01)
    e, n, ok = split.energy, split.n_atoms, np.isfinite(split.energy)
    resid = (e - split.composition(SPECIES) @ np.array(ref.energies_ev))[ok] / n[ok]
    np.testing.assert_allclose(ref.residual_std_per_atom_ev, np.std(resid), rtol=1e-9)
    # the chunked digest is the digest of the whole arrays
    src = np.frombuffer(str(split.source).encode(), np.uint8)
    assert whole[4]["sha256"] == run_folder._sha(src, split.frames, split.n_atoms, split.energy)


@pytest.mark.parametrize("n_small, n_large", [(20_000, 80_000)])
def test_split_heap_is_its_frame_index(tmp_path, monkeypatch, n_small, n_large):
    """A split holds 8 bytes per frame (its index); the reductions over it need the same heap for 2·10⁴ and
    8·10⁴ conformations (one more float64 per frame of the larger store would add 0.24 MB), chunks of 1024
    frames (both splits are several chunks long)."""
    monkeypatch.setattr(store_mod, "CHUNK_FRAMES", 1024)
    peaks, split_bytes = [], []
    for n in (n_small, n_large):
        view = synthetic_store(tmp_path / str(n), n)
        idx = np.arange(0, n, 2)
        split_bytes.append(traced_peak(lambda: view.subset(idx)) / len(idx))  # noqa: B023
        split = view.subset(idx)
        peaks.append(traced_peak(lambda: reductions(split)))  # noqa: B023
    assert all(7.9 < b < 8.2 for b in split_bytes), split_bytes
    assert peaks[1] - peaks[0] < 0.1 * 2**20, [p / 2**20 for p in peaks]


@pytest.mark.slow  # a compilation: 20 s on 2 loaded cores
def test_parity_predictions_are_bounded_and_metrics_unchanged(tmp_path):
    """`evaluate` with ``collect_max``: the errors are those of every structure, the predictions kept for the
    parity plots those of every k-th batch (k = ⌈50 / 12⌉ = 5: batches 0, 5, 10, 12 structures), equal to the
    same batches' rows of a full collection."""
    import jax

    from so3lib.data import bundled_path
    from so3lib.data.samples import SPICE_SAMPLE
    from so3lib.data.store import convert_spice
    from so3lib.models import make_config
    from so3lib.training import RunConfig, build_potential, evaluate, make_loader

    view = store_mod.open_store(convert_spice(bundled_path(SPICE_SAMPLE), tmp_path / "s", neutral_only=False))
    cfg = RunConfig(model=make_config("schnet", n_atom_basis=4, n_interactions=1), data={"energy_reference": "average"})
    pot = build_potential(cfg, view)
    loader = make_loader(view, pot, 4, False, 0, "test")
    params = pot.init(jax.random.PRNGKey(0), next(loader.epoch(0)))
    full = evaluate(pot, params, loader, collect=True)
    few = evaluate(pot, params, loader, collect=True, collect_max=12)
    kept = np.concatenate([np.arange(b * 4, b * 4 + 4) for b in (0, 5, 10)])
    assert len(view) == 50 and len(few["predictions"]["e_pred"]) == 12
    for k in ("e_ref", "e_pred", "n_atoms"):
        np.testing.assert_array_equal(few["predictions"][k], full["predictions"][k][kept])
    atoms = np.concatenate([np.arange(i * 27, i * 27 + 27) for i in kept])  # one molecule: 27 atoms a frame
    np.testing.assert_array_equal(few["predictions"]["f_pred"], full["predictions"]["f_pred"][atoms])
    assert {k: v for k, v in few.items() if k != "predictions"} == {k: v for k, v in full.items() if k != "predictions"}
