"""Training: typed run config, loss, optimiser, checkpoints, the loop and saved potentials."""
from so3lib.training.config import DataConfig, RunConfig, TrainingConfig
from so3lib.training.saving import load_potential, save_potential
from so3lib.training.trainer import NonFiniteLossError, build_potential, evaluate, make_loader, train

__all__ = ["DataConfig", "RunConfig", "TrainingConfig", "load_potential", "save_potential", "NonFiniteLossError",
           "build_potential", "evaluate", "make_loader", "train"]
