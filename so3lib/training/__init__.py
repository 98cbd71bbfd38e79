"""Training: typed run config, loss, optimiser, state and step, evaluation, checkpoints, the loop, the trainer that
wires them, and saved potentials (loaded on first use)."""

from so3lib._lazy import lazy_attributes

_WHERE = {
    "DataConfig": "so3lib.training.config",
    "RunConfig": "so3lib.training.config",
    "TrainingConfig": "so3lib.training.config",
    "load_potential": "so3lib.training.saving",
    "save_potential": "so3lib.training.saving",
    "CheckpointError": "so3lib.training.checkpoint",
    "NonFiniteLossError": "so3lib.training.loop",
    "Progress": "so3lib.training.state",
    "TrainState": "so3lib.training.state",
    "TrainingLoop": "so3lib.training.loop",
    "build_potential": "so3lib.training.trainer",
    "evaluate": "so3lib.training.evaluation",
    "make_loader": "so3lib.training.trainer",
    "train": "so3lib.training.trainer",
}
__getattr__, __dir__ = lazy_attributes(__name__, _WHERE)
__all__ = list(_WHERE)
