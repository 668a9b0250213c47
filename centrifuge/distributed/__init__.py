"""Several processes (torchrun): the process group, and how a model is wrapped
for data parallelism (DDP or FSDP2). The model and the training loop know
nothing of either; ``centrifuge.training.setup`` calls in here."""

from centrifuge.distributed.context import DistContext, init_distributed, shutdown_distributed
from centrifuge.distributed.parallelize import (
    PARALLEL_MODES, RESHARD_MODES, choose_parallel, choose_reshard, gradient_sync, parallelize,
    unsharded, uses_autocast,
)
from centrifuge.distributed.tensor_parallel import reduce_replicated_grads

__all__ = ["DistContext", "init_distributed", "shutdown_distributed", "PARALLEL_MODES", "RESHARD_MODES", "choose_parallel",
           "choose_reshard", "gradient_sync", "parallelize", "reduce_replicated_grads", "unsharded", "uses_autocast"]
