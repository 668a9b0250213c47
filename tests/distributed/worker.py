"""Run under ``torchrun`` by tests/test_distributed.py: train every configuration
given as JSON in argv[1] (a list of TrainConfig dicts) in this process group.

Popped from an entry before it becomes a TrainConfig: ``fail_on_rank`` makes that
rank raise at its first step (one rank's failure must stop the launch);
``sigterm_on_rank`` sends that rank a SIGTERM after step ``sigterm_at_step``
(every rank must stop after the same step, with a checkpoint)."""

import json
import sys

from centrifuge.distributed import shutdown_distributed
from centrifuge.training import TrainConfig, train


def failing(rank: int):
    import torch.distributed as dist

    def callback(step, record):
        if dist.get_rank() == rank:
            raise RuntimeError(f"injected failure on rank {rank} at step {step}")

    return callback


def sigterm(rank: int, at_step: int):
    import os
    import signal

    import torch.distributed as dist

    def callback(step, record):
        if dist.get_rank() == rank and step == at_step:
            os.kill(os.getpid(), signal.SIGTERM)

    return callback


def main() -> None:
    for entry in json.loads(sys.argv[1]):
        fail_rank = entry.pop("fail_on_rank", None)
        term_rank, term_step = entry.pop("sigterm_on_rank", None), entry.pop("sigterm_at_step", None)
        callback = None
        if fail_rank is not None:
            callback = failing(fail_rank)
        elif term_rank is not None:
            callback = sigterm(term_rank, term_step)
        train(TrainConfig(**entry), progress=False, callback=callback)
    shutdown_distributed()


if __name__ == "__main__":
    main()
