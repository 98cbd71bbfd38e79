"""so3krates-torch's runner for the peer comparison (run in its venv from `make_venvs.sh`): its So3krates model
and its own data pipeline (ase Atoms → its graphs, its neighbour list at the same cutoff) in a plain PyTorch loop,
eager, torch's default threads. ``--model so3krates``; ``--options`` JSON: features, l_max, layers, heads,
n_rbf (so3lib's names)."""

from __future__ import annotations

import importlib.metadata
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import protocol  # noqa: E402
import torch  # noqa: E402
from ase import Atoms  # noqa: E402
from so3krates_torch.data.utils import KeySpecification  # noqa: E402
from so3krates_torch.modules.models import So3krates  # noqa: E402
from so3krates_torch.tools.utils import AtomicNumberTable, create_dataloader_from_list  # noqa: E402


def batch(numbers, positions, energy, forces, cutoff):
    atoms = []
    for r, e, f in zip(positions, energy, forces, strict=True):
        a = Atoms(numbers=numbers, positions=r)
        a.info["REF_energy"], a.arrays["REF_forces"] = float(e), np.asarray(f)
        atoms.append(a)
    keys = KeySpecification(info_keys={"energy": "REF_energy"}, arrays_keys={"forces": "REF_forces"})
    loader = create_dataloader_from_list(
        atoms_list=atoms,
        batch_size=len(atoms),
        r_max=cutoff,
        r_max_lr=None,
        key_specification=keys,
        shuffle=False,
        z_table=AtomicNumberTable(list(range(1, 119))),
    )
    return next(iter(loader))


def build(b: dict, model: str, options: dict):
    if model != "so3krates":
        raise ValueError(f"so3krates-torch runner: unknown model {model!r} (known: so3krates)")
    cutoff = float(b["cutoff_angstrom"])
    z = b["numbers"]
    shift = len(z) * float(b["energy_per_atom_mean_ev"])
    train = batch(z, b["train_positions"], b["train_energy"] - shift, b["train_forces"], cutoff)
    test = batch(z, b["test_positions"], b["test_energy"] - shift, b["test_forces"], cutoff)
    one = batch(z, b["test_positions"][:1], b["test_energy"][:1] - shift, b["test_forces"][:1], cutoff)
    net = So3krates(
        r_max=cutoff,
        num_radial_basis_fn=int(options.get("n_rbf", 32)),
        degrees=list(range(1, int(options.get("l_max", 3)) + 1)),
        num_features=int(options.get("features", 132)),
        num_heads=int(options.get("heads", 4)),
        num_layers=int(options.get("layers", 3)),
        avg_num_neighbors=float(train.edge_index.shape[1]) / float(train.positions.shape[0]),
        dtype=torch.float32,
        seed=0,
    )
    opt = torch.optim.Adam(net.parameters(), lr=protocol.LEARNING_RATE)
    e_ref, f_ref = train.energy.float(), train.forces.float()

    def train_step():
        net.train()
        train.positions.requires_grad_(True)
        opt.zero_grad()
        out = net(train.to_dict(), training=True, compute_force=True)
        loss = protocol.ENERGY_WEIGHT * torch.mean((out["energy"] - e_ref) ** 2) + protocol.FORCES_WEIGHT * torch.mean(
            (out["forces"] - f_ref) ** 2
        )
        loss.backward()
        opt.step()
        return float(loss.detach())

    def energy_forces(g):
        def call():
            net.eval()
            g.positions.requires_grad_(True)
            out = net(g.to_dict(), training=False, compute_force=True)
            return out["energy"].detach().numpy(), out["forces"].detach().numpy()

        return call

    info = {
        "code": "so3krates-torch",
        "version": importlib.metadata.version("so3krates-torch"),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "model": model,
        "options": options,
        "edges_per_molecule": int(one.edge_index.shape[1]),
        "n_parameters": int(sum(p.numel() for p in net.parameters())),
    }
    ops = {"train_step": train_step, "energy_forces_1": energy_forces(one), "energy_forces_1000": energy_forces(test)}
    return info, ops


if __name__ == "__main__":
    protocol.serve(build)
