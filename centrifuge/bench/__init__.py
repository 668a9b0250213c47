"""``centrifuge bench``: the same training step timed as dense training, as the
usual masked-loss token filtering, as Centrifuge, and as Hugging Face
transformers with a masked loss — interleaved in one process."""

from centrifuge.bench.runner import BenchConfig, run_bench

__all__ = ["BenchConfig", "run_bench"]
