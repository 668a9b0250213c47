"""Data parallelism for a native model (or a patched transformers model of the
same family): DDP, or FSDP2 (``fully_shard``) per decoder layer plus the root.

Why these units: a decoder layer is one autograd Function (the compact
backward lives inside it), so it is also the natural unit to gather and
shard; the root unit holds the embedding, the final norm and the LM head, so a
tied embedding and the fused norm + LM head + cross-entropy each live in one
unit. With bf16 the FSDP2 mixed-precision policy gathers bf16 weights and
reduces gradients in fp32 against fp32 master shards (no autocast: the layers
then see bf16 weights and make no per-call casts that would keep unsharded
copies alive for the backward).
"""

from __future__ import annotations

import contextlib
import inspect
import warnings

import torch
from torch import nn

from centrifuge.distributed.context import DistContext

PARALLEL_MODES = ("auto", "none", "ddp", "fsdp")
RESHARD_MODES = ("auto", "on", "off")
GRAD_SYNC_MODES = ("auto", "every", "last")

# auto picks FSDP once parameters, gradients and AdamW's two moments (16 bytes
# per fp32 parameter) would take more than this share of one GPU's memory.
_DDP_MEMORY_SHARE = 0.5


def choose_parallel(mode: str, ctx: DistContext, n_params: int) -> str:
    """The mode of the data-parallel dimension: ``none`` for one replica (one
    process, or only tensor-parallel ranks); with several, the given one, or for
    ``auto`` DDP while the replicated training state fits comfortably, else
    FSDP. Why DDP first: on small models FSDP2's per-layer hooks and
    collectives dominate (measured 4.6x DDP's step time on the ``small``
    preset, 2 H200s), while on tinyllama-1.1b both keep the one-GPU
    Centrifuge/dense ratio (DDP 0.682, FSDP2 0.671, one GPU 0.669). Under
    tensor parallelism the replicas are FSDP's (the 2-D layout; DDP does not
    take DTensor weights)."""
    if mode not in PARALLEL_MODES:
        raise ValueError(f"parallel must be one of {PARALLEL_MODES}, got {mode!r}")
    if ctx.dp_size == 1:
        if mode in ("ddp", "fsdp"):
            raise ValueError(f"parallel {mode!r} needs several processes (data-parallel "
                             "replicas): start the run with torchrun --nproc-per-node N (N >= 2; "
                             "with tp > 1, N = tp x replicas)")  # fmt: skip
        return "none"
    if mode == "none":
        raise ValueError(f"parallel 'none' with {ctx.dp_size} data-parallel processes would train "
                         f"{ctx.dp_size} independent models: use ddp, fsdp or auto")  # fmt: skip
    if ctx.tp > 1:
        if mode == "ddp":
            raise ValueError("parallel 'ddp' is not supported with tensor parallelism (tp > 1): "
                             "use fsdp (or auto) for the data-parallel dimension")  # fmt: skip
        return "fsdp"
    if mode != "auto":
        return mode
    if ctx.device.type == "cuda":
        total = torch.cuda.get_device_properties(ctx.device).total_memory
        if 16 * n_params > _DDP_MEMORY_SHARE * total:
            return "fsdp"
    return "ddp"


def choose_reshard(reshard: str, ctx: DistContext, n_params: int) -> bool:
    """FSDP's reshard_after_forward. ``off`` keeps every layer's gathered bf16
    weights from its forward to its backward: no all-gather in the backward, so
    the reduce-scatters hide behind the (shorter) compact backward — measured
    on 2 H200s, tinyllama-1.1b: Centrifuge/dense 0.671 (one GPU: 0.669) against
    0.743 with ``on``, at 21.1 instead of 17.4 GiB. ``auto``: off while those
    weights (2 bytes per parameter) take at most a quarter of a GPU; under
    tensor parallelism a rank gathers its 1/tp share of them."""
    if reshard not in RESHARD_MODES:
        raise ValueError(f"fsdp_reshard must be one of {RESHARD_MODES}, got {reshard!r}")
    if reshard != "auto":
        return reshard == "on"
    if ctx.device.type == "cuda":
        return 2 * n_params / ctx.tp > 0.25 * torch.cuda.get_device_properties(ctx.device).total_memory
    return False


def choose_grad_sync(grad_sync: str, ctx: DistContext, n_params: int, mode: str) -> bool:
    """Whether FSDP reduce-scatters the gradients after every micro-batch (True)
    or only after a step's last one. ``last`` moves the fewest bytes, but FSDP2
    then keeps unsharded fp32 gradients between micro-batches (4 bytes per
    parameter of a rank's tensor-parallel share: 35 GB at 70B and tp = 8);
    ``every`` keeps them sharded at one reduce-scatter per micro-batch. ``auto``:
    ``last`` while those gradients take at most a tenth of a GPU (tinyllama-1.1b:
    4.4 GB), which leaves the memory to activations on the models that need it. Other modes
    than FSDP reduce after the last micro-batch."""
    if grad_sync not in GRAD_SYNC_MODES:
        raise ValueError(f"fsdp_grad_sync must be one of {GRAD_SYNC_MODES}, got {grad_sync!r}")
    if mode != "fsdp":
        return False
    if grad_sync != "auto":
        return grad_sync == "every"
    if ctx.device.type == "cuda":
        return 4 * n_params / ctx.tp > 0.1 * torch.cuda.get_device_properties(ctx.device).total_memory
    return False


def parallelize(model: nn.Module, ctx: DistContext, mode: str, dtype: str,
                reshard_after_forward: bool = False) -> nn.Module:  # fmt: skip
    """Wrap ``model`` for ``mode``: a native LlamaForCausalLM, or a transformers
    causal LM of the same family (``centrifuge.patch`` it first), on ``ctx.device``.
    reshard_after_forward (FSDP): see :func:`choose_reshard`. With ``ctx.tp`` > 1
    the native model is first split over the mesh's ``tp`` dimension
    (:mod:`centrifuge.distributed.tensor_parallel`), and FSDP shards over ``dp``.

    Returns the module to call in the training step: a DDP wrapper, or the
    model itself, sharded in place, for FSDP. Build the optimizer afterwards,
    from the returned module's parameters."""
    if ctx.tp > 1:
        from centrifuge.distributed.tensor_parallel import apply_tensor_parallel

        apply_tensor_parallel(model, ctx.mesh["tp"])
    if mode == "none":
        return model
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        # inv_freq is the only buffer: identical on every rank, nothing to sync per forward.
        no_sync = ({"forward_sync_buffers": False}
                   if "forward_sync_buffers" in inspect.signature(DDP).parameters
                   else {"broadcast_buffers": False})  # fmt: skip
        return DDP(model, device_ids=ids, **no_sync)
    if mode == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if dtype == "bf16" else MixedPrecisionPolicy())  # fmt: skip
        # A decoder layer returns its Function's output as a [B, L, d] view; nothing
        # modifies it in place, which is what FSDP2's warning about views is for.
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
        mesh = None if ctx.mesh is None else ctx.mesh["dp"]
        layers = list(model.model.layers)
        for i, layer in enumerate(layers):
            # The last layer's weights are the first the backward needs: keep them.
            fully_shard(layer, mesh=mesh, mp_policy=mp,
                        reshard_after_forward=reshard_after_forward and i < len(layers) - 1)
        fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=False)
        return model
    raise ValueError(f"unknown parallel mode {mode!r}")


def gradient_sync(model: nn.Module, last: bool):
    """Context for one micro-batch's forward and backward: gradients are reduced
    across processes in a step's last micro-batch only (DDP's ``no_sync``,
    FSDP2's ``set_requires_gradient_sync``); a no-op for a plain model."""
    from torch.distributed.fsdp import FSDPModule
    from torch.nn.parallel import DistributedDataParallel as DDP

    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(last)
    elif isinstance(model, DDP) and not last:
        return model.no_sync()
    return contextlib.nullcontext()


def uses_autocast(mode: str, dtype: str) -> bool:
    """bf16 runs autocast over fp32 weights, except under FSDP, whose policy casts."""
    return dtype == "bf16" and mode != "fsdp"


@contextlib.contextmanager
def unsharded(model: nn.Module):
    """Inside, the FSDP root's own weights (embedding, final norm, LM head) are
    whole, so code outside ``forward`` (evaluation, greedy decoding reading
    ``lm_head.weight``) can use them; every rank must enter it together.
    A no-op for other models."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(model, FSDPModule):
        yield
        return
    model.unshard()
    try:
        yield
    finally:
        model.reshard()
