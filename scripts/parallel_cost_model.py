"""Memory and step-time model of tensor + sequence parallelism x FSDP2 for the
native model, dense against Centrifuge (docs/parallelism.md, "70B at 8k context").

    python scripts/parallel_cost_model.py              # validation table + the 70B layouts
    python scripts/parallel_cost_model.py --rho 0.3 --nodes 2 4 --batch 1 2

Per GPU and micro-batch of N = batch x seq tokens per tensor-parallel group:

* Compute: the FLOPs of scripts/ckpt_cost_model.py (GEMMs G, attention A over
  c = L/2 visible keys, the LM head), divided by tp, at four achieved rates
  (GEMM / attention, forward / backward) solved from two dense one-GPU H200
  steps that differ only in context (tinyllama-1.1b 8x2048 and 2x8192: same
  GEMMs, 4x the attention). The compact backward and recompute run at the same
  rates (kept-row GEMMs are still >= thousands of rows; the kept-query
  recompute attention at the backward's attention rate).
* TP collectives: the bytes of docs/parallelism.md (forward 4Nc, backward
  6Nc dense / 6n̂c, or 4Nc / 4n̂c after a recompute, which costs 3Nc /
  (N + 2n̂)c per layer, n̂ = ρN: kept rows spread evenly) at a stated NVLink bus bandwidth, on the critical path (the
  layer Function issues them in line).
* FSDP2 over dp: per layer an all-gather of the bf16 shard (forward; again in
  the backward when resharding) and a reduce-scatter of the fp32 gradient,
  prefetched/overlapped with the neighbouring layer's compute: a layer exposes
  max(0, comm - compute); the first gather and last reduce-scatter are exposed.
  The root unit (embedding, final norm, LM head) is gathered at the forward's
  start and reduce-scattered after the whole backward: exposed. Bandwidth: a
  stated intra-node rate when dp stays on one node, inter-node otherwise.
* Per step: the replicated weights' gradient all-reduce over tp (fp32, on the
  dp shard).
* Memory: see :func:`memory`.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from ckpt_cost_model import layer_flops  # noqa: E402

from centrifuge.models import get_preset  # noqa: E402
from centrifuge.ops.linear_ce_triton import FORWARD_BUDGET  # noqa: E402

GB, GIB = 1e9, 2**30
BENCH = ROOT / "docs" / "benchmarks"


@dataclass(frozen=True)
class Layout:
    """One run: model, micro-batch (batch x seq_len tokens per tp group), ρ,
    tp x dp GPUs over ``nodes`` nodes. weights: 'train' (fp32 master, fp32
    gradient and AdamW's two moments, 16 B a parameter, sharded over dp),
    'bench-fp32' (the multi-GPU bench: fp32 master and gradient, no optimizer)
    or 'bench-bf16' (the one-GPU bench: bf16 weights and gradients, dp = 1).
    reshard: FSDP2 gathers the weights again for the backward."""

    preset: str
    seq_len: int
    batch: int
    rho: float = 0.5
    tp: int = 1
    dp: int = 1
    nodes: int = 1
    ckpt: bool = False
    weights: str = "train"
    reshard: bool = False
    grad_accum: int = 1


@dataclass(frozen=True)
class Hardware:
    """Achieved rates (TFLOP/s, GB/s of NCCL bus bandwidth) and capacity."""

    gemm_fwd: float
    attn_fwd: float
    gemm_bwd: float
    attn_bwd: float
    nvlink: float = 360.0  # NCCL all-gather/reduce-scatter bus bandwidth, 8 x H200, NVLink 4 (stated)
    fsdp_intra: float = 100.0  # FSDP2 collectives inside a node (stated, not measured)
    fsdp_inter: float = 40.0  # one 400 Gb/s NIC per GPU at ~80% (stated, not measured here)
    capacity_gib: float = 139.0  # usable of an H200's 141 GB


def _rows(name: str, **match) -> dict:
    """The row of a raw bench JSON (docs/benchmarks/) whose keys equal ``match``."""
    for r in json.loads((BENCH / name).read_text())["rows"]:
        if all(r.get(k) == v for k, v in match.items()):
            return r
    raise KeyError(f"{name}: no row {match}")


def _flops(c, tokens: int, keys: float, rho: float) -> dict:
    """Per-layer FLOPs of ``tokens`` tokens split into GEMM and attention parts:
    layer_flops at keys = 0 has no attention term."""
    full, gemm = layer_flops(c, keys, rho), layer_flops(c, 0.0, rho)
    return {k: (tokens * gemm[k], tokens * (full[k] - gemm[k])) for k in full}


def _head_flops(c, tokens: int, rho: float) -> tuple[float, float, float]:
    """LM head forward, dense backward, compact backward (docs/kernels.md)."""
    f = 2 * c.hidden_size * c.vocab_size * tokens
    return f, 2 * f, 2 * rho * f


CALIBRATION = [  # dense one-GPU H200 steps: the same GEMMs, 4x the attention
    ("tinyllama-1.1b", 8, 2048, "h200-2026-11-29-after-sync/tinyllama-1.1b-s2048-b8-bf16.json"),
    ("tinyllama-1.1b", 2, 8192, "tinyllama-1.1b-s8192-b2-bf16-ckpt.json"),
]


def calibrate(**stated) -> Hardware:
    """Solve t = gemm/R_gemm + attn/R_attn for forward and backward from the two
    dense steps of CALIBRATION (measured ms); ``stated`` overrides the rest."""
    eqs = {"fwd": [], "bwd": []}
    for preset, B, L, name in CALIBRATION:
        c, n = get_preset(preset), B * L
        f = _flops(c, n, L / 2, 1.0)
        hf, hb, _ = _head_flops(c, n, 1.0)
        row = _rows(name, variant="dense")
        eqs["fwd"].append((c.num_layers * f["forward"][0] + hf, c.num_layers * f["forward"][1],
                           row["forward_ms"] * 1e-3))  # fmt: skip
        eqs["bwd"].append((c.num_layers * f["backward_dense"][0] + hb,
                           c.num_layers * f["backward_dense"][1], row["backward_ms"] * 1e-3))  # fmt: skip
    rates = {}
    for phase, ((g1, a1, t1), (g2, a2, t2)) in eqs.items():
        det = g1 * a2 - g2 * a1  # Cramer's rule for 1/R_gemm, 1/R_attn
        inv_g, inv_a = (t1 * a2 - t2 * a1) / det, (g1 * t2 - g2 * t1) / det
        rates[f"gemm_{phase}"], rates[f"attn_{phase}"] = 1e-12 / inv_g, 1e-12 / inv_a
    return Hardware(**rates, **stated)


def _shards(c, lay: Layout) -> tuple[float, float]:
    """Parameters per GPU of the decoder layers (split by tp) and of the root
    unit (embedding, final norm, LM head: replicated over tp), before dp."""
    layers = c.num_layers * c.layer_parameters() / lay.tp
    return layers, c.num_parameters() - c.num_layers * c.layer_parameters()


def activation_bytes(c, ckpt: bool) -> float:
    """Saved per token and layer on one GPU without tp (bf16, the fp32 rstd and
    lse): x, q, k, v, o, x2, g, u + rstd1, rstd2, lse (Activations in
    centrifuge/models/layer.py); checkpointed: x and lse."""
    d, F, H, Hkv, D = c.hidden_size, c.intermediate_size, c.num_heads, c.num_kv_heads, c.head_dim
    lse = 4 * H
    if ckpt:
        return 2 * d + lse
    return 2 * (2 * d + 2 * H * D + 2 * Hkv * D + 2 * F) + 8 + lse


def memory(lay: Layout, c=None) -> dict:
    """Peak bytes on one GPU, dense and Centrifuge: the static part (weights and
    their states) plus the larger of the backward's start (every layer's saved
    activations, the LM head's logits chunk, one layer's backward workspace) and
    its end (every gradient the step produced, unless FSDP reduce-scattered it).
    Backward workspace per row: 4 F/tp + 4 H·D/tp + 2 d elements (dY and the
    gathered normalized input at full width); dense rows N, Centrifuge ρN."""
    c = c or get_preset(lay.preset)
    n = lay.batch * lay.seq_len
    layers, root = _shards(c, lay)
    fsdp = lay.dp > 1
    if lay.weights == "bench-bf16" and (fsdp or lay.tp > 1):
        raise ValueError("weights='bench-bf16' is the one-GPU bench: tp = dp = 1")
    shard = (layers + root) / lay.dp
    per_state = {"train": 16, "bench-fp32": 4, "bench-bf16": 2}[lay.weights]
    static = per_state * shard
    grad_bytes = {"train": 0, "bench-fp32": 4, "bench-bf16": 2}[lay.weights]  # not already static
    layer_params = c.layer_parameters() / lay.tp
    if fsdp:
        # Gathered bf16 weights: kept from forward to backward, or two layers in flight.
        # Kept weights measured 4.1 B a parameter (tinyllama 2 x H200, 21.05 - 17.36 GiB
        # for 0.97e9 layer parameters), not bf16's 2: taken as measured.
        static += (4 * layers if not lay.reshard else 2 * 2 * layer_params) + 2 * root
        if lay.grad_accum > 1:  # unsynced micro-batches: FSDP2 accumulates unsharded fp32 gradients
            static += 4 * layers
        end_grads = grad_bytes * shard + 2 * root  # the root's gradient waits for its reduce-scatter
    else:
        if lay.weights != "bench-bf16":  # autocast's bf16 copies, cached through the forward
            static += 2 * (layers + root)
        end_grads = grad_bytes * (layers + root)
    d, F, HD = c.hidden_size, c.intermediate_size, c.num_heads * c.head_dim
    ws_row = 2 * (4 * F / lay.tp + 4 * HD / lay.tp + 2 * d)
    acts = activation_bytes(c, lay.ckpt) * n / lay.tp * c.num_layers
    recompute = activation_bytes(c, False) * n / lay.tp if lay.ckpt else 0.0
    head_grad = (2 * root if fsdp else grad_bytes * root)
    out = {}
    for name, rows in (("dense", n), ("centrifuge", lay.rho * n)):
        ws = ws_row * rows + recompute
        start = acts + FORWARD_BUDGET + ws + head_grad
        end = end_grads + ws
        out[name] = static + max(start, end)
    out["static"] = static
    out["activations"] = acts
    return out


def _fsdp_exposed(per_layer_comm: float, per_layer_compute: float, layers: int) -> float:
    """Exposed time of per-layer collectives prefetched behind the neighbouring
    layer's compute: the first is exposed whole, the rest by what exceeds compute."""
    return per_layer_comm + (layers - 1) * max(0.0, per_layer_comm - per_layer_compute)


def step_time(lay: Layout, hw: Hardware, c=None) -> dict:
    """Seconds of one optimizer step (grad_accum micro-batches) on one GPU, dense
    and Centrifuge, with its parts."""
    c = c or get_preset(lay.preset)
    n, L, tp = lay.batch * lay.seq_len, c.num_layers, lay.tp
    f = _flops(c, n, lay.seq_len / 2, lay.rho)
    hf, hb_dense, hb_compact = _head_flops(c, n, lay.rho)
    fwd_rate, bwd_rate = (hw.gemm_fwd, hw.attn_fwd), (hw.gemm_bwd, hw.attn_bwd)

    def t(pair, rates):
        return (pair[0] / rates[0] + pair[1] / rates[1]) * 1e-12 / tp

    cb = (tp - 1) / tp * c.hidden_size * 2 / (hw.nvlink * GB)  # seconds per gathered row
    fwd_layer = t(f["forward"], fwd_rate) + 4 * n * cb
    kept = lay.rho * n
    # The backward's collectives: 6 row sets, 4 after a recompute (it reads the
    # h1 and h2 that the recompute gathered).
    sets = 4 if lay.ckpt else 6
    layer_bwd = {
        "dense": t(f["backward_dense"], bwd_rate) + sets * n * cb,
        "centrifuge": t(f["backward_compact"], bwd_rate) + sets * kept * cb,
    }
    if lay.ckpt:
        layer_bwd["dense"] += t(f["recompute_dense"], fwd_rate) + 3 * n * cb
        g_kv, a_kept = f["recompute_compact"]
        layer_bwd["centrifuge"] += (g_kv / hw.gemm_fwd + a_kept / hw.attn_bwd) * 1e-12 / tp \
            + (n + 2 * kept) * cb
    layers, root = _shards(c, lay)
    fsdp_bw = (hw.fsdp_intra if lay.nodes == 1 else hw.fsdp_inter) * GB
    share = (lay.dp - 1) / lay.dp
    ag = share * 2 * layers / L / fsdp_bw
    rs = share * 4 * layers / L / fsdp_bw
    root_comm = share * (2 + 4) * root / fsdp_bw  # gathered once, reduced after the backward
    replicated = 2 * (tp - 1) / tp * 4 * root / lay.dp / (hw.nvlink * GB) if tp > 1 else 0.0
    out = {}
    for name, head_b in (("dense", hb_dense), ("centrifuge", hb_compact)):
        compute = L * fwd_layer + hf / hw.gemm_fwd * 1e-12 / tp + L * layer_bwd[name] \
            + head_b / hw.gemm_bwd * 1e-12 / tp
        exposed_fwd = _fsdp_exposed(ag, fwd_layer, L) if lay.dp > 1 else 0.0
        exposed_sync = _fsdp_exposed(rs + (ag if lay.reshard else 0.0), layer_bwd[name], L) \
            if lay.dp > 1 else 0.0
        exposed_nosync = _fsdp_exposed(ag, layer_bwd[name], L) if lay.dp > 1 and lay.reshard else 0.0
        micro = compute + exposed_fwd
        total = lay.grad_accum * micro + (lay.grad_accum - 1) * exposed_nosync + exposed_sync \
            + root_comm + replicated
        out[name] = total
        out[f"{name}_compute"] = lay.grad_accum * compute
    out["ratio"] = out["centrifuge"] / out["dense"]
    out["tp_comm_fwd"] = L * 4 * n * cb
    return out


def _one_gpu(label: str, preset: str, seq: int, batch: int, raw: str, ckpt: bool = False) -> tuple:
    """A one-GPU bench row pair (dense, Centrifuge at ρ = 0.5), with or without checkpointing."""
    suffix = "-ckpt" if ckpt else ""
    return (label + (", ckpt" if ckpt else ""), Layout(preset, seq, batch, ckpt=ckpt, weights="bench-bf16"),
            raw, dict(variant="dense" + suffix), dict(variant="centrifuge" + suffix, ratio=0.5))  # fmt: skip


VALIDATION = [  # (label, layout, raw JSON, dense row, Centrifuge row)
    _one_gpu("tinyllama 8x2048, 1 GPU", "tinyllama-1.1b", 2048, 8,
             "h200-2026-11-29-after-sync/tinyllama-1.1b-s2048-b8-bf16.json"),
    *(_one_gpu(label, preset, seq, batch, raw, ckpt) for label, preset, seq, batch, raw in (
        ("tinyllama 2x8192, 1 GPU", "tinyllama-1.1b", 8192, 2, "tinyllama-1.1b-s8192-b2-bf16-ckpt.json"),
        ("tinyllama 1x32768, 1 GPU", "tinyllama-1.1b", 32768, 1, "tinyllama-1.1b-s32768-b1-bf16-ckpt.json"),
        ("llama3.2-3b 1x8192, 1 GPU", "llama3.2-3b", 8192, 1, "llama3.2-3b-s8192-b1-bf16-ckpt.json"),
    ) for ckpt in (False, True)),
    ("tinyllama 8x2048, 1 GPU, fp32 master", Layout("tinyllama-1.1b", 2048, 8, weights="bench-fp32"),
     "tinyllama-1.1b-s2048-b8-bf16-2gpu.json", dict(mode="single", variant="dense"),
     dict(mode="single", variant="centrifuge")),
    ("tinyllama 8x2048, FSDP2 2 GPUs, kept", Layout("tinyllama-1.1b", 2048, 8, dp=2, weights="bench-fp32"),
     "tinyllama-1.1b-s2048-b8-bf16-2gpu.json", dict(mode="fsdp-no-reshard", variant="dense"),
     dict(mode="fsdp-no-reshard", variant="centrifuge")),
    ("tinyllama 8x2048, FSDP2 2 GPUs, reshard",
     Layout("tinyllama-1.1b", 2048, 8, dp=2, weights="bench-fp32", reshard=True),
     "tinyllama-1.1b-s2048-b8-bf16-2gpu.json", dict(mode="fsdp", variant="dense"),
     dict(mode="fsdp", variant="centrifuge")),
    ("llama3.1-8b 4x2048, FSDP2 2 GPUs, reshard",
     Layout("llama3.1-8b", 2048, 4, dp=2, weights="bench-fp32", reshard=True),
     "llama3.1-8b-s2048-b4-bf16-2gpu.json", dict(mode="fsdp", variant="dense"),
     dict(mode="fsdp", variant="centrifuge")),
]  # fmt: skip


def validation(hw: Hardware) -> list[dict]:
    """Predicted against measured (raw JSON of docs/benchmarks) for VALIDATION."""
    out = []
    for label, lay, name, dense_row, cf_row in VALIDATION:
        a, b = _rows(name, **dense_row), _rows(name, **cf_row)
        s, m = step_time(lay, hw), memory(lay)
        out.append(dict(label=label, ms_dense=(s["dense"] * 1e3, a["step_ms"]),
                        ms_centrifuge=(s["centrifuge"] * 1e3, b["step_ms"]),
                        ratio=(s["ratio"], b["step_ms"] / a["step_ms"]),
                        gib_dense=(m["dense"] / GIB, a["peak_gib"]),
                        gib_centrifuge=(m["centrifuge"] / GIB, b["peak_gib"])))  # fmt: skip
    return out


def layouts(preset: str, seq_len: int, rho: float, tps, nodes_list, batches, accums,
            capacity_gib: float, gpus_per_node: int = 8):  # fmt: skip
    """Every layout of the grid (dp = nodes x gpus_per_node / tp), FSDP2's
    weights kept from forward to backward where that fits, else gathered again."""
    for tp in tps:
        for nodes in nodes_list:
            for ckpt in (False, True):
                for batch in batches:
                    for accum in accums:
                        lay = Layout(preset, seq_len, batch, rho, tp=tp, dp=nodes * gpus_per_node // tp,
                                     nodes=nodes, ckpt=ckpt, grad_accum=accum)  # fmt: skip
                        if lay.dp > 1 and memory(lay)["dense"] / GIB > capacity_gib:
                            lay = replace(lay, reshard=True)
                        yield lay


def _fmt(pair, spec):
    return f"{pair[0]:{spec}} / {pair[1]:{spec}}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="llama3-70b")
    p.add_argument("--seq-len", type=int, default=8192)
    p.add_argument("--rho", type=float, default=0.5)
    p.add_argument("--tp", type=int, nargs="+", default=[4, 8])
    p.add_argument("--nodes", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--grad-accum", type=int, nargs="+", default=[1])
    p.add_argument("--nvlink", type=float, default=Hardware.nvlink, help="GB/s, TP collectives")
    p.add_argument("--fsdp-intra", type=float, default=Hardware.fsdp_intra, help="GB/s, FSDP on one node")
    p.add_argument("--fsdp-inter", type=float, default=Hardware.fsdp_inter, help="GB/s, FSDP across nodes")
    args = p.parse_args()
    hw = calibrate(nvlink=args.nvlink, fsdp_intra=args.fsdp_intra, fsdp_inter=args.fsdp_inter)
    print(f"rates (TFLOP/s): GEMM fwd {hw.gemm_fwd:.0f}, bwd {hw.gemm_bwd:.0f}; "
          f"attention fwd {hw.attn_fwd:.0f}, bwd {hw.attn_bwd:.0f}; NVLink {hw.nvlink:.0f} GB/s, "
          f"FSDP {hw.fsdp_intra:.0f} GB/s in a node, {hw.fsdp_inter:.0f} GB/s across nodes\n")  # fmt: skip
    print("Validation, ρ = 0.5, predicted / measured (H200):")
    print("| run | step ms dense | step ms Centrifuge | step ratio | peak GiB dense | peak GiB Centrifuge |")
    print("|---|---|---|---|---|---|")
    for v in validation(hw):
        print(f"| {v['label']} | {_fmt(v['ms_dense'], '.0f')} | {_fmt(v['ms_centrifuge'], '.0f')} | "
              f"{_fmt(v['ratio'], '.3f')} | {_fmt(v['gib_dense'], '.1f')} | "
              f"{_fmt(v['gib_centrifuge'], '.1f')} |")  # fmt: skip
    print(f"\n{args.preset}, {args.seq_len} tokens a row, ρ = {args.rho}, AdamW (16 B a parameter "
          f"over dp), {hw.capacity_gib:.0f} GiB usable; weights: FSDP2's gathered weights kept "
          "from forward to backward, or gathered again:")  # fmt: skip
    print("| tp | nodes | dp | rows × accum | ckpt | weights | GiB dense / Centrifuge | fits | "
          "step s dense | step s Centrifuge | ratio | tokens/s/GPU Centrifuge |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for lay in layouts(args.preset, args.seq_len, args.rho, args.tp, args.nodes, args.batch,
                       args.grad_accum, hw.capacity_gib):  # fmt: skip
        m, s = memory(lay), step_time(lay, hw)
        fits = "yes" if m["dense"] / GIB <= hw.capacity_gib else "no"
        tok = lay.batch * lay.seq_len * lay.grad_accum / lay.tp / s["centrifuge"]
        weights = "—" if lay.dp == 1 else ("again" if lay.reshard else "kept")
        print(f"| {lay.tp} | {lay.nodes} | {lay.dp} | {lay.batch} × {lay.grad_accum} | "
              f"{'on' if lay.ckpt else 'off'} | {weights} | {m['dense'] / GIB:.0f} / "
              f"{m['centrifuge'] / GIB:.0f} | {fits} | {s['dense']:.2f} | {s['centrifuge']:.2f} | "
              f"{s['ratio']:.3f} | {tok:.0f} |")  # fmt: skip


if __name__ == "__main__":
    main()
