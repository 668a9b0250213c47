"""Step times of ``centrifuge train`` itself, eager and with --cuda-graphs: dense
(no selection), masked-loss filtering and Centrifuge, one run after another in
one process (the loop's own ``step_s``, median over the steps after the first
``--skip``, which hold the captures).

    python scripts/train_step_times.py OUT_DIR --model byte-110m --seq-len 512 --batch-size 16

Writes OUT_DIR/train-step-times.json and prints a Markdown table with the
ratios the bench reports (c/a: Centrifuge over dense, c/b: over masked), eager
and captured, for comparison with ``centrifuge bench --cuda-graphs``.

``--profile N`` (CUDA) also profiles N steps after ``--skip`` of every run and
reports the device's busy time per step (the union of its kernel intervals)
next to the step's wall time: where they are equal the device sets the pace,
where busy is shorter the device waits for the host between steps.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import collections  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from centrifuge.bench.runner import union_length  # noqa: E402
from centrifuge.training import TrainConfig, train  # noqa: E402
from centrifuge.training.metrics import read_metrics  # noqa: E402

VARIANTS = {"dense": dict(select="none"), "masked": dict(backward="exact"), "centrifuge": {}}


class DeviceBusy:
    """A ``train`` callback that profiles the device over steps ``after + 1 ..
    after + steps`` (CUDA kernels only: tracing the host would slow the host
    that is being measured). ``result``: per step, the window's wall ms, the
    device's busy ms and the kernels, and the kernels launched most often (name:
    launches per step; where fusing would cut launches)."""

    def __init__(self, after: int, steps: int):
        self.after, self.steps, self.result = after, steps, None

    def __call__(self, step: int, record: dict) -> None:
        from torch.autograd import DeviceType
        from torch.profiler import ProfilerActivity, profile

        if step == self.after:
            torch.cuda.synchronize()
            self.prof = profile(activities=[ProfilerActivity.CUDA])
            self.prof.__enter__()
            self.t0 = time.perf_counter()
        elif step == self.after + self.steps:
            torch.cuda.synchronize()
            wall = time.perf_counter() - self.t0
            self.prof.__exit__(None, None, None)
            kernels = [e for e in self.prof.events()
                       if e.device_type == DeviceType.CUDA and e.time_range.end > e.time_range.start]  # fmt: skip
            spans = sorted((e.time_range.start, e.time_range.end) for e in kernels)
            n = self.steps
            top = collections.Counter(e.name for e in kernels).most_common(12)
            self.result = dict(wall_ms=1e3 * wall / n, busy_ms=union_length(spans) / 1e3 / n,
                               kernels=len(spans) / n, most_launched={k: c / n for k, c in top})  # fmt: skip


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--model", default="byte-110m")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--skip", type=int, default=20, help="steps left out of the median (captures, warm-up)")
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--data", nargs="+", default=None, help="training data files (default: the built-in corpus)")
    p.add_argument("--cache-dir", default=None, help="token cache directory (centrifuge train's default if unset)")
    p.add_argument("--modes", nargs="+", choices=("eager", "graphs"), default=["eager", "graphs"],
                   help="run the loop eagerly, captured, or both")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="CUDA: profile N steps after --skip and report the device's busy time per step")
    args = p.parse_args(argv)
    if args.skip + args.profile >= args.steps:
        p.error(f"--skip {args.skip} + --profile {args.profile} must be below --steps {args.steps}")
    if args.profile and not torch.cuda.is_available():
        p.error("--profile needs CUDA (it measures the device's busy time)")
    modes = [m == "graphs" for m in args.modes]
    rows = {}
    for graphs in modes:
        for name, kw in VARIANTS.items():
            cfg = TrainConfig(model=args.model, select=kw.get("select", "loss"), ratio=args.ratio,
                              backward=kw.get("backward", "amplified"), seq_len=args.seq_len,
                              batch_size=args.batch_size, steps=args.steps, warmup_steps=5,
                              dtype=args.dtype, eval_interval=0, save_interval=0, eval_problems=0,
                              data=args.data, cache_dir=args.cache_dir,
                              out_dir=str(args.out / f"{name}{'-graphs' if graphs else ''}"),
                              overwrite=True, cuda_graphs=graphs)  # fmt: skip
            busy = DeviceBusy(args.skip, args.profile) if args.profile else None
            s = train(cfg, progress=False, callback=busy)
            times = [r["step_s"] for r in read_metrics(s["metrics"]) if r["kind"] == "train"][args.skip :]
            rows[(name, graphs)] = dict(step_ms=1e3 * statistics.median(times), cuda_graphs=s["cuda_graphs"],
                                        profile=busy and busy.result)  # fmt: skip
    result = dict(config=vars(args) | {"out": str(args.out)},
                  rows=[dict(variant=n, graphs=g, **r) for (n, g), r in rows.items()])  # fmt: skip
    (args.out / "train-step-times.json").write_text(json.dumps(result, indent=2))
    print(f"{args.model}, {args.batch_size} x {args.seq_len}, ρ = {args.ratio}, {args.dtype}, "
          f"median step of steps {args.skip + 1}..{args.steps}\n")
    print("| | dense ms | masked ms | Centrifuge ms | c/a | c/b | captured signatures |")
    print("|---|---|---|---|---|---|---|")
    for graphs in modes:
        a, b, c = (rows[(n, graphs)]["step_ms"] for n in VARIANTS)
        sig = rows[("centrifuge", graphs)]["cuda_graphs"]
        print(f"| {'CUDA graphs' if graphs else 'eager'} | {a:.1f} | {b:.1f} | {c:.1f} | {c / a:.3f} | "
              f"{c / b:.3f} | {sig['captured'] if sig else '—'} |")
    if args.profile:
        print(f"\nDevice busy time per step over steps {args.skip + 1}..{args.skip + args.profile} "
              "(profiled; wall = the window's time per step):\n")
        print("| | variant | wall ms | device busy ms | busy share | kernels |")
        print("|---|---|---|---|---|---|")
        for (name, graphs), r in rows.items():
            pr = r["profile"]
            print(f"| {'CUDA graphs' if graphs else 'eager'} | {name} | {pr['wall_ms']:.1f} | "
                  f"{pr['busy_ms']:.1f} | {pr['busy_ms'] / pr['wall_ms']:.2f} | {pr['kernels']:.0f} |")
        for (name, graphs), r in rows.items():
            if name == "centrifuge":
                print(f"\nCentrifuge{' (CUDA graphs)' if graphs else ''}, kernels launched most per step:\n")
                print("\n".join(f"- {c:g} × {k[:100]}" for k, c in r["profile"]["most_launched"].items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
