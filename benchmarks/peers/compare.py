"""so3lib beside its peers on the same batches, interleaved in one run: one training step (batch 32), energy and
forces of one molecule, and of a batch of 1000, for so3lib's models and the peers installed by `make_venvs.sh`.

Every runner (``run_<code>.py``, one process per model, each in its own venv) reads the same exported batches
(rMD17 ethanol split 01: the first 32 frames of the protocol's 950 training frames, the first test frame, all
1000 test frames; cutoff 5 Å, under which every ethanol pair is a neighbour, so every code sees the same
72-edge graphs). The runners are started and warmed up one after another (compilation never overlaps a
measurement), then measured in rounds: each round asks every runner for every operation in turn (the order
rotates from round to round), so a load on the machine falls on all of them alike; each figure is the median
over the rounds of the per-round median. Ratios are the peer's time over so3lib's model of the same family.

    python benchmarks/peers/compare.py                          # every runner whose venv exists
    python benchmarks/peers/compare.py --rounds 9 --only "so3lib SchNet" "SchNetPack SchNet"
    python benchmarks/peers/compare.py --venvs ~/peers --label "quiet machine"

Writes benchmarks/results/peers.json and peers.png (``--out``); a runner that fails to start is recorded with
its error (and its log under ``--logs``), never silently dropped.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import select
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

import protocol  # noqa: E402

CUTOFF = 5.0
SCHNET = {"n_atom_basis": 128, "n_interactions": 3, "n_rbf": 20}
SO3KRATES = {"features": 132, "l_max": 3, "layers": 3, "heads": 4}
NEQUIP_SMALL = {"num_layers": 2, "l_max": 2, "target_irreps": "32x0e + 32x0o + 16x1o + 16x1e + 8x2e + 8x2o"}
# label, venv ("so3lib": this interpreter), script, model, options, family, so3lib's reference of the family
RUNNERS = [
    ("so3lib SchNet", "so3lib", "run_so3lib.py", "schnet", SCHNET, "SchNet", True),
    ("SchNetPack SchNet", "schnetpack", "run_schnetpack.py", "schnet", SCHNET, "SchNet", False),
    ("so3lib SO3krates", "so3lib", "run_so3lib.py", "so3krates", SO3KRATES, "SO3krates", True),
    (
        "so3krates-torch SO3krates",
        "so3krates-torch",
        "run_so3krates_torch.py",
        "so3krates",
        SO3KRATES,
        "SO3krates",
        False,
    ),
    ("mlip NequIP (small)", "mlip", "run_mlip.py", "nequip", NEQUIP_SMALL, "SO3krates", False),
    ("so3lib BPNN", "so3lib", "run_so3lib.py", "bpnn", {}, "descriptor", True),
    ("apax GMNN", "apax", "run_apax.py", "gmnn", {}, "descriptor", False),
]
REPEATS = {"train_step": 5, "energy_forces_1": 20, "energy_forces_1000": 1}


def export_batches(path: Path, data_dir: str | None) -> dict:
    """The shared batches as npz (see `protocol.load_batches`); returns what they are, for the JSON."""
    from so3lib.workflows.md17 import load

    tr, _, te, source, _ = load("rmd17", "ethanol", 1, data_dir)
    n = int(tr.offsets[1])

    def frames(ds, count=None):
        k = len(ds) if count is None else count
        return ds.positions[: k * n].reshape(k, n, 3), ds.energy[:k], ds.forces[: k * n].reshape(k, n, 3)

    r_tr, e_tr, f_tr = frames(tr, 32)
    r_te, e_te, f_te = frames(te)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(
        path,
        numbers=tr.numbers[:n].astype(np.int64),
        train_positions=r_tr,
        train_energy=e_tr,
        train_forces=f_tr,
        test_positions=r_te,
        test_energy=e_te,
        test_forces=f_te,
        cutoff_angstrom=np.float64(CUTOFF),
        energy_per_atom_mean_ev=np.float64(np.mean(tr.energy / n)),
    )
    return {
        "source": source,
        "train": "frames 0-31 of the protocol's 950 training frames (split 01, seed 1)",
        "test": f"all {len(te)} test frames (energy_forces_1: the first)",
        "atoms": n,
        "cutoff_angstrom": CUTOFF,
        "edges_per_molecule": int(protocol.pairs_within(r_te[0], CUTOFF).shape[1]),
        "file": str(path),
    }


class Runner:
    """One runner process and its replies (one JSON line each, with a timeout)."""

    def __init__(self, label, python, script, model, options, batches: Path, log: Path, timeout_s: float, threads=None):
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        if threads is not None:  # the same thread count for torch (OpenMP/MKL) and XLA's CPU runtime
            env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
            if threads == 1:
                env["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
        cmd = [python, str(HERE / script), "--batches", str(batches), "--model", model]
        cmd += ["--options", json.dumps(options)]
        log.parent.mkdir(parents=True, exist_ok=True)
        self.label, self.log, self.timeout_s = label, log, timeout_s
        self.err = open(log, "w")  # noqa: SIM115 (closed in close())
        pipe = subprocess.PIPE
        self.proc = subprocess.Popen(cmd, stdin=pipe, stdout=pipe, stderr=self.err, text=True, env=env)

    def reply(self, timeout_s: float | None = None) -> dict:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout_s or self.timeout_s)
        if not ready:
            raise TimeoutError(f"{self.label}: no reply within {timeout_s or self.timeout_s:.0f} s (log: {self.log})")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.label}: the runner exited (status {self.proc.wait()}; log: {self.log})")
        return json.loads(line)

    def ask(self, op: str, repeats: int) -> list[float]:
        self.proc.stdin.write(json.dumps({"op": op, "repeats": repeats}) + "\n")
        self.proc.stdin.flush()
        r = self.reply()
        if "error" in r:
            raise RuntimeError(f"{self.label} {op}: {r['error']}")
        return r["times_s"]

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=30)
            except (BrokenPipeError, subprocess.TimeoutExpired):
                self.proc.kill()
        self.err.close()


def python_of(venv: str, venvs: Path) -> Path | None:
    if venv == "so3lib":
        return Path(sys.executable)
    exe = venvs / venv / "bin" / "python"
    return exe if exe.exists() else None


def summarise(per_round: dict[str, list[float]]) -> dict:
    out = {}
    for op, values in per_round.items():
        v = np.asarray(values)
        out[op] = {
            "median_s": float(np.median(v)),
            "min_s": float(np.min(v)),
            "max_s": float(np.max(v)),
            "rounds_s": [float(x) for x in v],
        }
    return out


def ratios(results: dict) -> None:
    """peer time / so3lib's time of the family (> 1: so3lib is faster), in place."""
    refs = {r["family"]: r for r in results.values() if r.get("so3lib_reference") and "ops" in r}
    for r in results.values():
        ref = refs.get(r["family"])
        if "ops" not in r or ref is None:
            continue
        r["reference"] = [k for k, v in results.items() if v is ref][0]
        r["time_ratio_to_so3lib"] = {op: r["ops"][op]["median_s"] / ref["ops"][op]["median_s"] for op in r["ops"]}


def plot(results: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [(k, v) for k, v in results.items() if "ops" in v]
    titles = {
        "train_step": "train step, batch 32 (ms)",
        "energy_forces_1": "energy+forces, 1 molecule (ms)",
        "energy_forces_1000": "energy+forces, batch 1000 (ms)",
    }
    colours = {"SchNet": "tab:blue", "SO3krates": "tab:orange", "descriptor": "tab:green"}
    fig, axes = plt.subplots(1, 3, figsize=(15, 0.55 * len(done) + 1.8), sharey=True)
    labels = [k for k, _ in done]
    y = np.arange(len(done))[::-1]
    for ax, op in zip(axes, protocol.OPS, strict=True):
        ms = [1e3 * v["ops"][op]["median_s"] for _, v in done]
        lo = [1e3 * (v["ops"][op]["median_s"] - v["ops"][op]["min_s"]) for _, v in done]
        hi = [1e3 * (v["ops"][op]["max_s"] - v["ops"][op]["median_s"]) for _, v in done]
        ax.barh(y, ms, xerr=[lo, hi], color=[colours.get(v["family"], "grey") for _, v in done], alpha=0.85)
        for yi, (_, v), m, h in zip(y, done, ms, hi, strict=True):
            ratio = v.get("time_ratio_to_so3lib", {}).get(op)
            tag = (f"{m:,.0f}" if m >= 100 else f"{m:.3g}") + (
                "" if v.get("so3lib_reference") or ratio is None else f"  ({ratio:.2f}× so3lib)"
            )
            ax.text(m + h, yi, " " + tag, va="center", fontsize=8)
        ax.set_xscale("log")
        ax.set_title(titles[op], fontsize=10)
        ax.set_xlim(right=max(ms) * 8)
    axes[0].set_yticks(y, labels, fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--venvs", default=os.environ.get("SO3LIB_PEERS_DIR", str(Path.home() / ".cache" / "so3lib-peers")))
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--only", nargs="+", help="runner labels (default: all whose venv exists)")
    ap.add_argument("--data-dir", default=None, help="rMD17 folder (default: the md17 command's)")
    ap.add_argument("--label", default="shared machine", help="what the machine was doing (quiet, shared, ...)")
    ap.add_argument("--setup-timeout-s", type=float, default=900)
    ap.add_argument("--threads", type=int, choices=[1], default=None, help="1: every runner single-threaded")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "peers.json"))
    ap.add_argument("--logs", default=str(ROOT / "runs" / "peers"))
    ap.add_argument("--plot-only", metavar="JSON", help="draw the PNG of a results file again, measure nothing")
    a = ap.parse_args(argv)
    if a.plot_only:
        doc = json.loads(Path(a.plot_only).read_text())
        title = f"rMD17 ethanol, {doc['label']}, {doc['date']} (median of {doc['rounds']} rounds)"
        plot(doc["runners"], Path(a.plot_only).with_suffix(".png"), title)
        return doc
    known = [r[0] for r in RUNNERS]
    for name in a.only or []:
        if name not in known:
            ap.error(f"--only: unknown runner {name!r} (known: {', '.join(known)})")
    logs, venvs = Path(a.logs), Path(a.venvs).expanduser()
    batches = logs / "batches.npz"
    data_info = export_batches(batches, a.data_dir)
    load_start = os.getloadavg()
    results: dict[str, dict] = {}
    runners: dict[str, Runner] = {}
    try:
        for label, venv, script, model, options, family, is_ref in RUNNERS:
            if a.only and label not in a.only:
                continue
            entry = {"venv": venv, "model": model, "options": options, "family": family, "so3lib_reference": is_ref}
            results[label] = entry
            py = python_of(venv, venvs)
            if py is None:
                entry["skipped"] = f"no venv {venvs / venv} (bash benchmarks/peers/make_venvs.sh {venvs} {venv})"
                print(f"{label}: skipped ({entry['skipped']})")
                continue
            log = logs / f"{label.replace(' ', '_').replace('(', '').replace(')', '')}.log"
            t0 = time.perf_counter()
            run = Runner(label, str(py), script, model, options, batches, log, a.setup_timeout_s, a.threads)
            try:
                first = run.reply()
            except (TimeoutError, RuntimeError, json.JSONDecodeError) as exc:
                first = {"error": str(exc)}
            if "error" in first:
                entry["error"] = first["error"]
                entry["log"] = str(log)
                print(f"{label}: failed to start: {first['error']} (log: {log})")
                run.close()
                continue
            entry["info"], runners[label] = first["ready"], run
            n_par = first["ready"].get("n_parameters")
            print(f"{label}: ready in {time.perf_counter() - t0:.1f} s ({n_par} parameters)")
        per_round: dict[str, dict[str, list[float]]] = {k: {op: [] for op in protocol.OPS} for k in runners}
        order = list(runners)
        for rnd in range(a.rounds):
            turn = order[rnd % len(order) :] + order[: rnd % len(order)] if order else []
            for label in turn:
                for op in protocol.OPS:
                    per_round[label][op].append(float(np.median(runners[label].ask(op, REPEATS[op]))))
                time.sleep(0.2)  # let the previous runner's threads go idle before the next one
            print(f"round {rnd + 1}/{a.rounds} done")
        for label in runners:
            results[label]["ops"] = summarise(per_round[label])
    finally:
        for run in runners.values():
            run.close()
    ratios(results)
    for label, r in results.items():
        if "ops" in r:
            o = r["ops"]
            rt = r.get("time_ratio_to_so3lib")
            ms = {op: 1e3 * o[op]["median_s"] for op in protocol.OPS}
            print(
                f"{label:28s} step {ms['train_step']:8.2f} ms  1 mol {ms['energy_forces_1']:7.2f} ms"
                f"  1000: {ms['energy_forces_1000']:8.1f} ms"
                + (f"  ratios {', '.join(f'{v:.2f}' for v in rt.values())}" if rt and not r["so3lib_reference"] else "")
            )
    out = Path(a.out)
    doc = {
        "what": "so3lib and peers on the same batches, interleaved rounds; median over rounds of per-round medians",
        "label": a.label,
        "command": "python benchmarks/peers/compare.py " + shlex.join(sys.argv[1:] if argv is None else argv),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "load_avg": {"start": load_start, "end": os.getloadavg()},
        },
        "rounds": a.rounds,
        "threads": a.threads or "each code's default (2 cores)",
        "repeats_per_round": REPEATS,
        "loss": f"{protocol.ENERGY_WEIGHT}·MSE(E) + {protocol.FORCES_WEIGHT}·MSE(F), Adam lr {protocol.LEARNING_RATE}",
        "data": data_info,
        "runners": results,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    if any("ops" in r for r in results.values()):
        title = f"rMD17 ethanol, {a.label}, {doc['date']} (median of {a.rounds} rounds)"
        plot(results, out.with_suffix(".png"), title)
    print(f"wrote {out}")
    return doc


if __name__ == "__main__":
    main()
