"""Run under ``torchrun`` by tests/test_sharded_build.py: build the model of every
TrainConfig given as JSON in argv[2] (a list of dicts) as ``centrifuge train``
does (``setup.check``, ``begin``, ``build``), counting the bytes of the tensors
alive at once during ``build``; rank 0 saves to argv[1] a list with, per
config, ``weights`` (the full parameters, gathered) and per rank ``peak`` (bytes),
``check_peak`` (the same during ``setup.check``, which reads a model directory),
``local`` (bytes of the rank's own parameter shards), ``local_elements`` (their
elements), ``read`` (elements that ``check`` and ``build`` read from a
checkpoint's tensors, as ``StoredTensor`` blocks) and ``largest`` (bytes of the
largest full parameter)."""

import json
import sys
import weakref

import torch
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from centrifuge.distributed import init_distributed, shutdown_distributed
from centrifuge.models.llama import StoredTensor
from centrifuge.training import TrainConfig, setup


class LiveBytes(TorchDispatchMode):
    """Peak bytes of the (non-meta) storages that ops create inside it and that
    are alive at once, each counted until it is freed. A DTensor an op returns
    counts as its local tensor (the ops DTensor runs underneath are not seen)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.seen: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, DTensor):
                t = t._local_tensor
            if isinstance(t, torch.Tensor) and not t.is_meta:
                self._count(t.untyped_storage())
        return out

    def _count(self, storage) -> None:
        key = id(storage)
        if key in self.seen:
            return
        self.seen.add(key)
        self.live += storage.nbytes()
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key, storage.nbytes())

    def _free(self, key: int, nbytes: int) -> None:
        self.seen.discard(key)
        self.live -= nbytes


class CountReads:
    """Elements of the blocks that ``StoredTensor`` reads return while it is entered."""

    def __enter__(self):
        self.read, self._original = 0, StoredTensor.__getitem__

        def counted(t, index):
            block = self._original(t, index)
            self.read += block.numel()
            return block

        StoredTensor.__getitem__ = counted
        return self

    def __exit__(self, *exc):
        StoredTensor.__getitem__ = self._original


def main() -> None:
    out, results = sys.argv[1], []
    for entry in json.loads(sys.argv[2]):
        cfg = TrainConfig(**entry)
        ctx = init_distributed(cfg.device, cfg.tp)
        with CountReads() as reads:
            with LiveBytes() as checking:
                checked = setup.check(cfg, ctx, progress=False)
            setup.begin(checked)
            with LiveBytes() as mem:
                run = setup.build(checked, progress=False)
        params = dict(run.module.named_parameters())
        parts = [p.to_local() if isinstance(p, DTensor) else p for p in params.values()]
        local, local_elements = sum(t.nbytes for t in parts), sum(t.numel() for t in parts)
        largest = max(p.numel() * p.element_size() for p in params.values())
        weights = {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
                   for n, p in params.items()}  # fmt: skip
        ranks = ctx.gather(dict(peak=mem.peak, check_peak=checking.peak, local=local,
                                local_elements=local_elements, read=reads.read, largest=largest))
        results.append(dict(weights=weights, ranks=ranks))
    if ctx.is_main:
        torch.save(results, out)
    shutdown_distributed()


if __name__ == "__main__":
    main()
