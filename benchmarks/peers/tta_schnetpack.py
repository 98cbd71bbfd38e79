"""SchNetPack SchNet trained for a wall-clock budget (run in the schnetpack venv by `time_to_accuracy.py`).

The model as in `run_schnetpack.py` (SchNetPack's SchNet, Atomwise, Forces), energies offset by the training
split's mean energy per atom (SchNetPack's AddOffsets), a plain PyTorch loop: Adam at a constant learning rate,
batch 32 reshuffled every epoch, loss 0.01·MSE(E) + 0.99·MSE(F); the validation errors after every epoch
(inside the budget, as so3lib's evaluations are); the parameters of the lowest validation loss tested on the
test frames at the end. The clock starts at the first step: building the model and the batches' index arrays
(every frame of one molecule has the same pairs) comes before it.

    python tta_schnetpack.py --split SPLIT.npz --budget-minutes 6 --out RESULT.json [--options JSON]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import protocol  # noqa: E402
import torch  # noqa: E402
from run_schnetpack import inputs, schnet  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--split", required=True)
    ap.add_argument("--budget-minutes", type=float, required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--options", default="{}")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--learning-rate", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    s = protocol.load_batches(a.split)
    torch.manual_seed(a.seed)
    rng = np.random.default_rng(a.seed)
    cutoff, z = float(s["cutoff_angstrom"]), s["numbers"]
    n_atoms, shift = len(z), len(z) * float(s["energy_per_atom_mean_ev"])
    net = schnet(json.loads(a.options), cutoff)
    opt = torch.optim.Adam(net.parameters(), lr=a.learning_rate)
    template: dict[int, dict] = {}  # the batch dict of each batch size (pairs and indices), positions swapped in

    def batch(positions: np.ndarray) -> dict:
        k = len(positions)
        if k not in template:
            template[k] = inputs(z, positions, cutoff)
        d = dict(template[k])
        d["_positions"] = torch.as_tensor(positions.reshape(-1, 3), dtype=torch.float32)
        return d

    def errors(prefix: str, size: int = 100) -> dict:
        net.eval()
        r, e, f = s[f"{prefix}_positions"], s[f"{prefix}_energy"], s[f"{prefix}_forces"]
        de, df = [], []
        for i in range(0, len(r), size):
            out = net(batch(r[i : i + size]))
            de.append(out["energy"].detach().numpy().astype(np.float64) + shift - e[i : i + size])
            df.append(out["forces"].detach().numpy().astype(np.float64).reshape(-1, n_atoms, 3) - f[i : i + size])
        de, df = np.concatenate(de), np.concatenate(df)
        return {
            "energy_mae_mev": 1e3 * float(np.mean(np.abs(de))),
            "forces_mae_mev_per_a": 1e3 * float(np.mean(np.abs(df))),
            "loss": protocol.ENERGY_WEIGHT * float(np.mean(de**2)) + protocol.FORCES_WEIGHT * float(np.mean(df**2)),
        }

    r_tr = s["train_positions"]
    e_tr = torch.as_tensor(s["train_energy"] - shift, dtype=torch.float32)
    f_tr = torch.as_tensor(s["train_forces"], dtype=torch.float32)
    budget_s, curve, best = 60.0 * a.budget_minutes, [], {"loss": np.inf}
    step, epoch = 0, 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < budget_s:
        net.train()
        order = rng.permutation(len(r_tr))
        for i in range(0, len(order), a.batch_size):
            idx = order[i : i + a.batch_size]
            opt.zero_grad()
            out = net(batch(r_tr[idx]))
            loss = protocol.ENERGY_WEIGHT * torch.mean((out["energy"] - e_tr[idx]) ** 2)
            loss = loss + protocol.FORCES_WEIGHT * torch.mean((out["forces"] - f_tr[idx].reshape(-1, 3)) ** 2)
            loss.backward()
            opt.step()
            step += 1
            if time.perf_counter() - t0 >= budget_s:
                break
        epoch += 1
        val = errors("val")
        point = {"time_s": time.perf_counter() - t0, "step": step, "epoch": epoch}
        curve.append({**point, **{f"val_{k}": v for k, v in val.items()}})
        if val["loss"] < best["loss"]:
            best = {"loss": val["loss"], "step": step, "state": copy.deepcopy(net.state_dict())}
    train_time_s = time.perf_counter() - t0
    net.load_state_dict(best["state"])
    test = errors("test")
    result = {
        "code": "SchNetPack",
        "train_time_s": train_time_s,
        "steps": step,
        "epochs": epoch,
        "steps_per_s": step / train_time_s,
        "best_step": best["step"],
        "test": test,
        "curve": curve,
        "torch_threads": torch.get_num_threads(),
        "recipe": f"Adam lr {a.learning_rate} constant, batch {a.batch_size}, loss 0.01·MSE(E) + 0.99·MSE(F), "
        "validation every epoch, best validation loss tested",
    }
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
