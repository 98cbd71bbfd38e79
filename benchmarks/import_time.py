"""Import cost: ``import so3lib`` (and what a user touches first) against ``import jax``, each in a fresh process,
minimum of ``--repeats`` runs, measured side by side on the same machine.

usage: python benchmarks/import_time.py [--repeats 3] [--out benchmarks/results/import_time.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path

STATEMENTS = {
    "import jax": "import jax",
    "import so3lib": "import so3lib",
    "so3lib.load_calculator (SchNet path)": "import so3lib; so3lib.load_calculator",
    "make_config('schnet')": "from so3lib.models import make_config; make_config('schnet')",
    "make_config('so3krates')": "from so3lib.models import make_config; make_config('so3krates')",
}


def time_import(statement: str) -> float:
    code = f"import time; t = time.perf_counter(); {statement}; print(time.perf_counter() - t)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "import_time.json")
    a = ap.parse_args(argv)
    seconds = {}
    for _ in range(a.repeats):  # interleaved, so a busy moment hits every statement alike
        for name, stmt in STATEMENTS.items():
            seconds.setdefault(name, []).append(time_import(stmt))
    best = {k: min(v) for k, v in seconds.items()}
    result = {
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "python": platform.python_version(),
        "repeats": a.repeats,
        "min_seconds": best,
        "all_seconds": seconds,
        "ratio_to_import_jax": {k: v / best["import jax"] for k, v in best.items()},
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    for k, v in best.items():
        print(f"{k:40s} {v:6.2f} s  ({v / best['import jax']:.2f} × import jax)")
    return result


if __name__ == "__main__":
    main()
