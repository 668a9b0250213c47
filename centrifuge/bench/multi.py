"""``torchrun --nproc-per-node N -m centrifuge.cli bench --parallel ...``: the
dense / masked / Centrifuge steps timed with DDP and FSDP2 on N GPUs, next to
the same steps on one GPU (every process alone, no communication, first), so
the Centrifuge/dense ratio of each mode sits beside the single-GPU ratio.

Every process trains on its own batch (``batch`` rows per GPU); a step is the
forward and the backward including the gradient reduction (DDP's all-reduce,
FSDP's all-gathers and reduce-scatters), timed with CUDA events on rank 0.
Weights are fp32 masters with bf16 compute, as ``centrifuge train --dtype bf16``
trains: autocast for one GPU and DDP, FSDP2's mixed-precision policy for FSDP.
Scaling efficiency = one GPU's step time / the mode's step time (same rows per GPU).
"""

from __future__ import annotations

import gc
import statistics
from dataclasses import asdict

import torch

from centrifuge.bench.runner import BenchConfig, Timer, environment, speedups, time_step
from centrifuge.bench.variants import Variant, native_variants
from centrifuge.distributed import init_distributed, parallelize, uses_autocast
from centrifuge.models import build_model, get_preset

MODES = ("ddp", "fsdp", "fsdp-no-reshard")


def _autocast_variants(variants: list[Variant], autocast: bool) -> list[Variant]:
    if not autocast:
        return variants

    def wrap(loss):
        def step(ids, ratio):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return loss(ids, ratio)

        return step

    return [Variant(v.name, v.label, wrap(v.loss), v.filtered, v.module) for v in variants]


def _time_mode(cfg: BenchConfig, mode: str, ctx, config, ids, progress) -> list[dict]:
    """Rows (variant, ratio, medians, peak GiB) of one mode."""
    model = build_model(config, dtype=torch.float32, device=ctx.device, seed=cfg.seed)
    if mode == "single":
        wrapped, autocast = model, uses_autocast("none", cfg.dtype)
    else:
        base = "fsdp" if mode.startswith("fsdp") else mode
        wrapped = parallelize(model, ctx, base, cfg.dtype,
                              reshard_after_forward=mode != "fsdp-no-reshard")  # fmt: skip
        autocast = uses_autocast(base, cfg.dtype)
    variants = _autocast_variants(native_variants(wrapped), autocast)
    jobs = [(v, r) for r in cfg.ratios for v in variants if v.filtered]
    jobs += [(v, 1.0) for v in variants if not v.filtered]
    timer = Timer(ctx.device)
    samples = {(v.name, r): [] for v, r in jobs}
    torch.cuda.reset_peak_memory_stats(ctx.device)
    rounds = range(cfg.warmup + cfg.repeats)
    for i in rounds if progress is None else progress(rounds, desc=mode):
        for v, r in jobs:  # interleaved, as in the one-GPU bench
            fb = time_step(v, ids, r, timer)
            if i >= cfg.warmup:
                samples[(v.name, r)].append(fb)
    peak = torch.cuda.max_memory_allocated(ctx.device) / 2**30
    del model, wrapped, variants
    gc.collect()
    torch.cuda.empty_cache()
    rows = []
    for v, r in jobs:
        s = samples[(v.name, r)]
        rows.append(dict(mode=mode, variant=v.name, label=v.label, ratio=r if v.filtered else None,
                         forward_ms=statistics.median(f for f, _ in s),
                         backward_ms=statistics.median(b for _, b in s),
                         step_ms=statistics.median(f + b for f, b in s), peak_gib=peak))  # fmt: skip
    return rows


def run_multi_bench(cfg: BenchConfig, modes: list[str], single: bool = True, progress=None) -> dict | None:
    """Time every mode; returns the JSON-ready result on rank 0 (None elsewhere)."""
    for m in modes:
        if m not in MODES:
            raise ValueError(f"unknown parallel mode {m!r}; choose from {MODES}")
    ctx = init_distributed(cfg.device)
    if not ctx.distributed or ctx.device.type != "cuda":
        raise ValueError("the multi-GPU bench runs under torchrun on GPUs: "
                         "torchrun --nproc-per-node N -m centrifuge.cli bench --parallel ddp fsdp")  # fmt: skip
    config = get_preset(cfg.preset)
    if cfg.layers is not None:
        config.num_layers = cfg.layers
    config.max_position_embeddings = max(config.max_position_embeddings, cfg.seq_len)
    g = torch.Generator().manual_seed(cfg.seed + ctx.rank)  # every GPU its own rows
    ids = torch.randint(0, config.vocab_size, (cfg.batch, cfg.seq_len), generator=g).to(ctx.device)
    per_mode = {}
    for mode in (["single"] if single else []) + list(modes):
        per_mode[mode] = _time_mode(cfg, mode, ctx, config, ids, progress if ctx.is_main else None)
        ctx.barrier()
    if not ctx.is_main:
        return None
    rows = [r for v in per_mode.values() for r in v]
    summary = []
    for mode, v in per_mode.items():
        entry = dict(mode=mode, ratios=speedups(v, cfg.ratios))
        if mode != "single" and "single" in per_mode:
            one = {_key(r): r["step_ms"] for r in per_mode["single"]}
            entry["scaling_efficiency"] = {_key(r): one[_key(r)] / r["step_ms"] for r in v}
        summary.append(entry)
    return dict(environment=dict(environment(ctx.device), gpus=ctx.world_size), config=asdict(cfg),
                model=dict(preset=cfg.preset, layers=config.num_layers,
                           parameters=config.num_parameters(),
                           tokens_per_step_per_gpu=cfg.batch * cfg.seq_len),
                rows=rows, summary=summary)  # fmt: skip


def _key(row: dict) -> str:
    return row["variant"] if row["ratio"] is None else f"{row['variant']}@{row['ratio']:g}"


def to_markdown(result: dict) -> str:
    env, m, cfg = result["environment"], result["model"], result["config"]
    lines = [f"**{m['preset']}** ({m['layers']} layers, {m['parameters'] / 1e9:.2f} B parameters), "
             f"{env['gpus']} × {env['device']}, seq {cfg['seq_len']} × batch {cfg['batch']} per GPU, "
             f"{cfg['dtype']}, torch {env['torch']}", "",
             "| mode | variant | ρ | forward ms | backward ms | step ms | peak GiB |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in result["rows"]:
        rho = "—" if r["ratio"] is None else f"{r['ratio']:.2f}"
        lines.append(f"| {r['mode']} | {r['label']} | {rho} | {r['forward_ms']:.1f} | "
                     f"{r['backward_ms']:.1f} | {r['step_ms']:.1f} | {r['peak_gib']:.2f} |")  # fmt: skip
    lines += ["", "Centrifuge / dense step time per mode (scaling efficiency = one GPU's step / "
              "the mode's step):", "", "| mode | ρ | step c/a | backward c/a | efficiency dense | "
              "efficiency Centrifuge |", "|---|---|---|---|---|---|"]  # fmt: skip
    fmt = lambda x: "—" if x is None else f"{x:.3f}"  # noqa: E731
    for s in result["summary"]:
        eff = s.get("scaling_efficiency", {})
        for e in s["ratios"]:
            ca, rho = e.get("c/a", {}), e["ratio"]
            lines.append(f"| {s['mode']} | {rho:.2f} | {fmt(ca.get('step'))} | "
                         f"{fmt(ca.get('backward'))} | {fmt(eff.get('dense'))} | "
                         f"{fmt(eff.get(f'centrifuge@{rho:g}'))} |")  # fmt: skip
    return "\n".join(lines)
