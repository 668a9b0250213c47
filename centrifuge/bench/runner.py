"""Run the benchmark: every variant, every ratio, interleaved, in one process."""

from __future__ import annotations

import platform
import statistics
import time
import warnings
from dataclasses import asdict, dataclass, field

import torch

from centrifuge.bench.variants import (
    SFTLabels,
    Variant,
    graphed_variants,
    hf_liger_variant,
    hf_masked_variant,
    hf_model,
    hf_patched_labels_variant,
    hf_patched_variant,
    native_variants,
    with_lora,
)
from centrifuge.device import resolve_device
from centrifuge.models import build_model, get_preset
from centrifuge.plan import BackwardOptions
from centrifuge.selection import check_ratio

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class BenchConfig:
    preset: str = "tinyllama-1.1b"
    seq_len: int = 2048
    batch: int = 8
    ratios: list[float] = field(default_factory=lambda: [0.3, 0.5, 0.7, 1.0])
    layers: int | None = None  # fewer layers than the preset (e.g. 8B on one GPU)
    dtype: str = "bf16"
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    warmup: int = 3
    repeats: int = 10
    hf: bool = True  # include HF transformers + masked loss (the external baseline)
    # HF + Liger-Kernel as the peer instead. Liger patches transformers' RoPE
    # module-wide, so it gets its own run rather than sharing one with plain HF.
    liger: bool = False
    breakdown_ratio: float | None = 0.5  # profile the backward by component here
    # Also time every native variant with activation checkpointing (and the HF
    # models with transformers' gradient checkpointing).
    activation_checkpointing: bool = False
    lora: int | None = None  # LoRA rank: every model gets peft adapters on its projections
    seed: int = 0
    # Quality knobs timed as extra Centrifuge variants (BackwardOptions.parse specs).
    knobs: list[str] = field(default_factory=list)
    # Supervised fine-tuning: this share of every row is a prompt labelled -100
    # (context rows); the native steps only.
    prompt_share: float = 0.0
    # Also time every native step captured as CUDA graphs (``-graph`` rows).
    cuda_graphs: bool = False

    def __post_init__(self):
        """Every option checked before anything runs."""
        SFTLabels(self.prompt_share)
        self.ratios = [check_ratio(r) for r in self.ratios]
        if not self.ratios:
            raise ValueError("give at least one ratio")
        if self.breakdown_ratio is not None:
            check_ratio(self.breakdown_ratio)
        for name, low in (("seq_len", 2), ("batch", 1), ("repeats", 1), ("warmup", 0)):
            if getattr(self, name) < low:
                raise ValueError(f"{name.replace('_', '-')} must be at least {low}, got {getattr(self, name)}")
        n = get_preset(self.preset).num_layers
        if self.layers is not None and not 1 <= self.layers <= n:
            raise ValueError(f"layers must lie in 1..{n} (the {self.preset} preset's layers), got {self.layers}")
        if self.lora is not None and self.lora < 1:
            raise ValueError(f"lora rank must be a positive integer, got {self.lora}")
        for spec in self.knobs:
            opts = BackwardOptions.parse(spec)
            opts.check_layers(self.layers or n)
            low = [r for r in self.ratios if r > (opts.backward_ratio or 1.0)]
            if low:
                raise ValueError(f"--knob {spec}: the backward set holds the kept rows, so every "
                                 f"ratio must be at most {opts.backward_ratio:g} (give --ratios; "
                                 f"{', '.join(f'{r:g}' for r in low)} exceed it)")  # fmt: skip
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        device = resolve_device(self.device)
        if self.liger and device.type != "cuda":
            raise ValueError(f"--liger needs a CUDA device (Liger-Kernel's kernels run on GPUs), not {device}")
        if self.cuda_graphs and device.type != "cuda":
            raise ValueError(f"--cuda-graphs needs a CUDA device, not {device}")
        if self.cuda_graphs and self.warmup < 1:
            raise ValueError("--cuda-graphs needs --warmup 1 or more (the first round captures the steps)")


class Timer:
    """Device-side timing: CUDA events on GPU, a host clock on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def elapsed_ms(self, a, b) -> float:
        if self.cuda:
            b.synchronize()
            return a.elapsed_time(b)
        return (b - a) * 1e3


def time_step(variant: Variant, ids, ratio: float, timer: Timer) -> tuple[float, float]:
    """(forward ms, backward ms) of one step; gradients are dropped afterwards."""
    t0 = timer.mark()
    loss = variant.loss(ids, ratio)
    t1 = timer.mark()
    loss.backward()
    t2 = timer.mark()
    fwd, bwd = timer.elapsed_ms(t0, t1), timer.elapsed_ms(t1, t2)
    variant.module.zero_grad(set_to_none=True)
    return fwd, bwd


def peak_memory_gib(variant: Variant, ids, ratio: float) -> float | None:
    """Peak bytes a step needs: the variant's weights plus what the step allocates
    (activations, gradients, logits), so co-resident models do not count."""
    if ids.device.type != "cuda":
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    variant.loss(ids, ratio).backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    variant.module.zero_grad(set_to_none=True)
    weights = sum(p.numel() * p.element_size() for p in variant.module.parameters())
    return (weights + extra) / 2**30


CATEGORIES = (
    ("attention", ("flash", "attn", "attention", "fmha", "_dq_kernel", "_dkdv_kernel", "_o_kernel")),
    ("gemm", ("gemm", "gemv", "cutlass", "nvjet", "xmma", "cublas", "matmul")),
    ("norm/rope/act", ("norm", "rope", "rotary", "swiglu", "silu", "sigmoid", "rsqrt")),
    ("cross-entropy", ("cross_entropy", "log_softmax", "logsumexp", "nll", "_ce_")),
    ("gather/scatter", ("index", "gather", "scatter", "nonzero")),
)


def backward_breakdown(variant: Variant, ids, ratio: float) -> tuple[dict[str, float], list]:
    """Device time (ms) of one backward, summed per component from kernel names,
    and the ten most expensive kernels (to check the categories)."""
    from torch.profiler import ProfilerActivity, profile

    loss = variant.loss(ids, ratio)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        loss.backward()
        torch.cuda.synchronize()
    variant.module.zero_grad(set_to_none=True)
    out: dict[str, float] = {}
    kernels = []
    for evt in prof.key_averages():
        ms = evt.self_device_time_total / 1e3
        if ms <= 0:
            continue
        name = evt.key.lower()
        cat = next((c for c, keys in CATEGORIES if any(k in name for k in keys)), "other")
        out[cat] = out.get(cat, 0.0) + ms
        kernels.append((ms, cat, evt.key[:120]))
    return out, sorted(kernels, reverse=True)[:10]


# Profiled for kernels, syncs and idle time (and every knob variant, centrifuge+...).
PROFILED_STEPS = ("dense", "masked", "centrifuge", "hf-masked", "hf-patched",
                  "hf-patched-labels", "hf-liger-masked", "hf-liger-patched",
                  "dense-graph", "masked-graph", "centrifuge-graph")  # fmt: skip
# Host ops that wait for the device: .item()/bool()/int() on a CUDA tensor, and
# nonzero / boolean indexing (their output size lives on the device).
SYNC_OPS = ("aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select")


def union_length(spans: list[tuple[float, float]]) -> float:
    """Total length covered by sorted (start, end) intervals, overlaps counted
    once (kernels of several streams may overlap)."""
    busy, end = 0.0, float("-inf")
    for a, b in spans:
        if b > end:
            busy += b - max(a, end)
            end = b
    return busy


def step_profile(variant: Variant, ids, ratio: float) -> dict:
    """Where one step's wall time goes on the device (CUDA only): kernel launches,
    host syncs, and idle time (the step's span minus the union of kernel
    intervals: launch-bound stretches and the waits after each sync); and, from
    an unprofiled step, how long the host takes to issue it (``host_ms``, until
    ``backward()`` returns) against its wall time: equal when the host, not the
    device, sets the pace."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    variant.loss(ids, ratio).backward()
    host = time.perf_counter() - t0
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    variant.module.zero_grad(set_to_none=True)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        variant.loss(ids, ratio).backward()
        torch.cuda.synchronize()
    variant.module.zero_grad(set_to_none=True)
    events = prof.events()
    spans = sorted((e.time_range.start, e.time_range.end) for e in events
                   if e.device_type == DeviceType.CUDA and e.time_range.end > e.time_range.start)  # fmt: skip
    busy = union_length(spans)
    span = spans[-1][1] - spans[0][0] if spans else 0.0
    syncs = {op: sum(e.name == op for e in events) for op in SYNC_OPS}
    return dict(kernels=len(spans), span_ms=span / 1e3, busy_ms=busy / 1e3,
                idle_ms=(span - busy) / 1e3, syncs=sum(syncs.values()), sync_ops=syncs,
                host_ms=host * 1e3, wall_ms=wall * 1e3)  # fmt: skip


def environment(device: torch.device) -> dict:
    env = {"torch": torch.__version__, "python": platform.python_version()}
    if device.type == "cuda":
        env["device"] = torch.cuda.get_device_name(device)
        try:
            import triton

            env["triton"] = triton.__version__
        except ImportError:
            pass
    else:
        env["device"] = platform.processor() or "cpu"
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except ImportError:
        pass
    return env


def build_variants(cfg: BenchConfig, device) -> tuple[list[Variant], object]:
    config = get_preset(cfg.preset)
    if cfg.layers is not None:
        config.num_layers = cfg.layers
    # Timing needs no trained positions: a preset published at 2k (TinyLlama)
    # is timed at 8k as it would be after context extension (reported below).
    config.max_position_embeddings = max(config.max_position_embeddings, cfg.seq_len)
    dtype = DTYPES[cfg.dtype]
    model = build_model(config, dtype=dtype, device=device, seed=cfg.seed)
    ckpt = cfg.activation_checkpointing
    if cfg.lora:
        model = with_lora(model, cfg.lora)
    variants = native_variants(model, ckpt, tuple(cfg.knobs), cfg.prompt_share)
    if cfg.cuda_graphs:
        variants += graphed_variants(native_variants(model, ckpt, tuple(cfg.knobs), cfg.prompt_share,
                                                     captured=True))  # fmt: skip
    if cfg.prompt_share:  # the HF peers time pretraining labels: not comparable
        return variants, config

    def hf():
        m = hf_model(config, dtype, device, checkpointing=ckpt)
        return with_lora(m, cfg.lora) if cfg.lora else m

    if cfg.liger:
        torch.manual_seed(cfg.seed)
        variants.append(hf_liger_variant(hf()))
        torch.manual_seed(cfg.seed)  # Liger's users add centrifuge.patch (its ops replace Liger's)
        liger_patched = hf_liger_variant(hf()).module
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the patch says that it replaces Liger's ops
            variants.append(hf_patched_labels_variant(
                liger_patched, "hf-liger-patched", "HF + Liger-Kernel + centrifuge.patch, labels="))
    elif cfg.hf:
        torch.manual_seed(cfg.seed)
        label = "HF transformers" + (" + gradient checkpointing" if ckpt else "") + ", masked loss"
        variants.append(hf_masked_variant(hf(), label=label))
        torch.manual_seed(cfg.seed)  # the same weights, patched: the one-line change
        variants.append(hf_patched_variant(hf()))
        torch.manual_seed(cfg.seed)  # and the second form: labels= (fused loss, no logits)
        variants.append(hf_patched_labels_variant(hf()))
    return variants, config


def run_bench(cfg: BenchConfig, progress=None) -> dict:
    """Returns a JSON-ready dict: environment, config, one row per (variant, ratio)
    with forward/backward/step medians and peak memory, ratios and breakdown."""
    device = torch.device(cfg.device)
    variants, config = build_variants(cfg, device)
    g = torch.Generator(device="cpu").manual_seed(cfg.seed)
    ids = torch.randint(0, config.vocab_size, (cfg.batch, cfg.seq_len), generator=g).to(device)
    timer = Timer(device)
    jobs = [(v, r) for r in cfg.ratios for v in variants if v.filtered] + [
        (v, 1.0) for v in variants if not v.filtered
    ]
    samples = {(v.name, r): [] for v, r in jobs}
    rounds = range(cfg.warmup + cfg.repeats)
    for i in rounds if progress is None else progress(rounds, desc="bench rounds"):
        for v, r in jobs:  # interleaved: drifting clocks hit every variant alike
            fb = time_step(v, ids, r, timer)
            if i >= cfg.warmup:
                samples[(v.name, r)].append(fb)
    rows = []
    for v, r in jobs:
        fwd = statistics.median(f for f, _ in samples[(v.name, r)])
        bwd = statistics.median(b for _, b in samples[(v.name, r)])
        step = statistics.median(f + b for f, b in samples[(v.name, r)])
        rows.append(dict(variant=v.name, label=v.label, ratio=r if v.filtered else None,
                         forward_ms=fwd, backward_ms=bwd, step_ms=step,
                         # A replay allocates nothing: its memory is the captures' pool.
                         peak_gib=None if v.name.endswith("-graph") else peak_memory_gib(v, ids, r)))  # fmt: skip
    result = dict(
        environment=environment(device),
        config=asdict(cfg),
        model=dict(preset=cfg.preset, layers=config.num_layers,
                   max_position_embeddings=config.max_position_embeddings,
                   parameters=config.num_parameters(), tokens_per_step=cfg.batch * cfg.seq_len,
                   trainable=sum(p.numel() for p in variants[0].module.parameters() if p.requires_grad)),
        rows=rows,
        ratios=speedups(rows, cfg.ratios),
    )  # fmt: skip
    br = cfg.breakdown_ratio
    if device.type == "cuda" and br is not None:
        profiled = {v.name: backward_breakdown(v, ids, br) for v in variants
                    if v.name in ("dense", "masked", "centrifuge", "dense-ckpt", "centrifuge-ckpt")}  # fmt: skip
        result["breakdown"] = {k: b for k, (b, _) in profiled.items()}
        result["top_kernels"] = {k: top for k, (_, top) in profiled.items()}
        result["breakdown_ratio"] = br
        result["step_profile"] = {v.name: step_profile(v, ids, br) for v in variants
                                  if v.name in PROFILED_STEPS or v.name.startswith("centrifuge+")}  # fmt: skip
    return result


def speedups(rows: list[dict], ratios: list[float]) -> list[dict]:
    """Centrifuge's times over the others' (c/a dense, c/b masked, c/d HF), and
    each knob variant's over dense (``knobs``)."""
    by = {(r["variant"], r["ratio"]): r for r in rows}
    out = []
    for ratio in ratios:
        c = by.get(("centrifuge", ratio))
        if c is None:
            continue
        entry = {"ratio": ratio}
        cc = by.get(("centrifuge-ckpt", ratio))
        cg = by.get(("centrifuge-graph", ratio))
        for key, mine, other in (
            ("c/a", c, ("dense", None)), ("c/b", c, ("masked", ratio)),
            ("c/d", c, ("hf-masked", ratio)), ("c/liger", c, ("hf-liger-masked", ratio)),
            # The patched HF model against native Centrifuge (target: step <= 1.05, peak <= 1.1).
            ("hfp/c", by.get(("hf-patched-labels", ratio)), ("centrifuge", ratio)),
            ("hflp/c", by.get(("hf-liger-patched", ratio)), ("centrifuge", ratio)),
            # With activation checkpointing: against dense and masked with it, and
            # against Centrifuge without it (the price of the memory saved).
            ("cc/ac", cc, ("dense-ckpt", None)), ("cc/bc", cc, ("masked-ckpt", ratio)),
            ("cc/c", cc, ("centrifuge", ratio)),
            # CUDA graphs: Centrifuge against dense and masked, all captured, and
            # each captured step against its eager self.
            ("cg/ag", cg, ("dense-graph", None)), ("cg/bg", cg, ("masked-graph", ratio)),
            ("cg/c", cg, ("centrifuge", ratio)), ("ag/a", by.get(("dense-graph", None)), ("dense", None)),
        ):  # fmt: skip
            o = by.get(other)
            if o is not None and mine is not None:
                entry[key] = dict(step=mine["step_ms"] / o["step_ms"],
                                  backward=mine["backward_ms"] / o["backward_ms"])  # fmt: skip
                if mine["peak_gib"] is not None and o["peak_gib"] is not None:
                    entry[key]["peak"] = mine["peak_gib"] / o["peak_gib"]
        dense = by.get(("dense", None))
        knobs = {name: dict(step=r["step_ms"] / dense["step_ms"],
                            backward=r["backward_ms"] / dense["backward_ms"])
                 for (name, r_ratio), r in by.items()
                 if name.startswith("centrifuge+") and r_ratio == ratio and dense}  # fmt: skip
        if knobs:
            entry["knobs"] = knobs
        out.append(entry)
    return out
