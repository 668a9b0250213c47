"""Training with token filtering: ``train(TrainConfig(...))`` or ``centrifuge train``."""

from centrifuge.training.checkpoint import CheckpointError
from centrifuge.training.config import TrainConfig
from centrifuge.training.loop import StopTraining
from centrifuge.training.pipeline import train

__all__ = ["TrainConfig", "train", "StopTraining", "CheckpointError"]
