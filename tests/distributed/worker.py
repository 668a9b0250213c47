"""Run under ``torchrun`` by tests/test_distributed.py: train every configuration
given as JSON in argv[1] (a list of TrainConfig dicts) in this process group.

An entry's ``fail_on_rank`` (popped before it becomes a TrainConfig) makes that
rank raise at its first step, to test that one rank's failure stops the launch."""

import json
import sys

from centrifuge.training import TrainConfig, train


def main() -> None:
    for entry in json.loads(sys.argv[1]):
        fail_rank = entry.pop("fail_on_rank", None)
        cfg = TrainConfig(**entry)
        callback = None
        if fail_rank is not None:
            import torch.distributed as dist

            def callback(step, record, rank=fail_rank):
                if dist.get_rank() == rank:
                    raise RuntimeError(f"injected failure on rank {rank} at step {step}")

        train(cfg, progress=False, callback=callback)


if __name__ == "__main__":
    main()
