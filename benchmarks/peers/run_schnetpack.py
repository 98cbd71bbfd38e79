"""SchNetPack's runner for the peer comparison (run in the schnetpack venv of `make_venvs.sh`): SchNetPack's
SchNet (representation, Atomwise, Forces, as its own configs assemble it) in a plain PyTorch loop, eager, with
torch's default threads. ``--model schnet``; ``--options`` JSON: n_atom_basis, n_interactions, n_rbf."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import protocol  # noqa: E402
import schnetpack as spk  # noqa: E402
import schnetpack.properties as P  # noqa: E402
import torch  # noqa: E402


def inputs(numbers: np.ndarray, positions: np.ndarray, cutoff: float) -> dict[str, torch.Tensor]:
    """SchNetPack's batch dict for frames (B, N, 3) of one molecule, every pair within the cutoff."""
    b, n = positions.shape[:2]
    idx_i, idx_j = [], []
    for k in range(b):
        s, r = protocol.pairs_within(positions[k], cutoff)
        idx_i.append(s + k * n)
        idx_j.append(r + k * n)
    idx_i, idx_j = np.concatenate(idx_i), np.concatenate(idx_j)
    return {
        P.Z: torch.as_tensor(np.tile(numbers, b), dtype=torch.long),
        P.R: torch.as_tensor(positions.reshape(-1, 3), dtype=torch.float32),
        P.idx_m: torch.repeat_interleave(torch.arange(b), n),
        P.n_atoms: torch.full((b,), n, dtype=torch.long),
        P.idx_i: torch.as_tensor(idx_i, dtype=torch.long),
        P.idx_j: torch.as_tensor(idx_j, dtype=torch.long),
        P.offsets: torch.zeros((len(idx_i), 3)),
        P.cell: torch.zeros((b, 3, 3)),
        P.pbc: torch.zeros((b, 3), dtype=torch.bool),
    }


def schnet(options: dict, cutoff: float):
    f = int(options.get("n_atom_basis", 128))
    rep = spk.representation.SchNet(
        n_atom_basis=f,
        n_interactions=int(options.get("n_interactions", 3)),
        radial_basis=spk.nn.GaussianRBF(n_rbf=int(options.get("n_rbf", 20)), cutoff=cutoff),
        cutoff_fn=spk.nn.CosineCutoff(cutoff),
    )
    return spk.model.NeuralNetworkPotential(
        representation=rep,
        input_modules=[spk.atomistic.PairwiseDistances()],
        output_modules=[spk.atomistic.Atomwise(n_in=f, output_key="energy"), spk.atomistic.Forces()],
    )


def build(b: dict, model: str, options: dict):
    if model != "schnet":
        raise ValueError(f"schnetpack runner: unknown model {model!r} (known: schnet)")
    torch.manual_seed(0)
    cutoff = float(b["cutoff_angstrom"])
    net = schnet(options, cutoff)
    z = b["numbers"]
    train = inputs(z, b["train_positions"], cutoff)
    e_ref = torch.as_tensor(b["train_energy"] - len(z) * b["energy_per_atom_mean_ev"], dtype=torch.float32)
    f_ref = torch.as_tensor(b["train_forces"].reshape(-1, 3), dtype=torch.float32)
    test, one = inputs(z, b["test_positions"], cutoff), inputs(z, b["test_positions"][:1], cutoff)
    opt = torch.optim.Adam(net.parameters(), lr=protocol.LEARNING_RATE)

    def train_step():
        net.train()
        opt.zero_grad()
        out = net(dict(train))
        loss = protocol.ENERGY_WEIGHT * torch.mean((out["energy"] - e_ref) ** 2) + protocol.FORCES_WEIGHT * torch.mean(
            (out["forces"] - f_ref) ** 2
        )
        loss.backward()
        opt.step()
        return float(loss.detach())

    def energy_forces(batch):
        def call():
            net.eval()
            out = net(dict(batch))
            return out["energy"].detach().numpy(), out["forces"].detach().numpy()

        return call

    info = {
        "code": "schnetpack",
        "version": spk.__version__ if hasattr(spk, "__version__") else None,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "model": model,
        "options": options,
        "n_parameters": int(sum(p.numel() for p in net.parameters())),
    }
    ops = {"train_step": train_step, "energy_forces_1": energy_forces(one), "energy_forces_1000": energy_forces(test)}
    return info, ops


if __name__ == "__main__":
    protocol.serve(build)
