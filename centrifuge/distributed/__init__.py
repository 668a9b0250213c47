"""Several processes (torchrun): the process group, and how a model is wrapped
for data parallelism (DDP or FSDP2) and tensor parallelism, and how a split model
gets its weights shard by shard, fresh or from a checkpoint (``materialize``).
``centrifuge.training.setup`` calls in here; the model knows only the tensor-parallel group its layers are given
(``centrifuge.models.tensor_parallel``), the loop only ``gradient_sync`` and
``reduce_replicated_grads``."""

from centrifuge.distributed.context import DistContext, init_distributed, shutdown_distributed
from centrifuge.distributed.materialize import materialize
from centrifuge.distributed.parallelize import (
    GRAD_SYNC_MODES, PARALLEL_MODES, RESHARD_MODES, choose_grad_sync, choose_parallel, choose_reshard,
    gradient_sync, parallelize, unsharded, uses_autocast,
)
from centrifuge.distributed.tensor_parallel import reduce_replicated_grads

__all__ = ["DistContext", "init_distributed", "shutdown_distributed", "GRAD_SYNC_MODES",
           "materialize", "PARALLEL_MODES", "RESHARD_MODES", "choose_grad_sync", "choose_parallel", "choose_reshard", "gradient_sync", "parallelize",
           "reduce_replicated_grads", "unsharded", "uses_autocast"]
