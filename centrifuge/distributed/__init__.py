"""Several processes (torchrun): the process group, and how a model is wrapped
for data parallelism (DDP or FSDP2). The model and the training loop know
nothing of either; ``centrifuge.training.setup`` calls in here."""

from centrifuge.distributed.context import DistContext, init_distributed
from centrifuge.distributed.parallelize import (
    PARALLEL_MODES, choose_parallel, parallelize, unsharded, uses_autocast,
)

__all__ = ["DistContext", "init_distributed", "PARALLEL_MODES", "choose_parallel", "parallelize",
           "unsharded", "uses_autocast"]
