"""FLOP cost model of activation checkpointing with the compact recompute
(docs/kernels.md, "Activation checkpointing"), and its check against FLOPs
counted on the CPU reference path.

    python scripts/ckpt_cost_model.py [--rho R]  # predictions for the benchmark shapes
    python scripts/ckpt_cost_model.py --count    # + counted vs predicted on a small model (CPU)

Per token and layer (forward): G = the projections' GEMMs (2 x in x out each),
A = 4 H D c for the attention (S = QKᵀ and PV over c visible keys per query).
Backward: 2 G (dX and dW) + 2.5 A dense (flash: 5 matmuls); on kept rows
ρ·2G + (3ρ + 4ρ²)/5 · 2.5A (the split dQ / dK,dV kernels). Recompute: the dense
one is the forward without the down projection (its output is not needed);
the compact one is K/V for every row plus ρ·(Q, attention of kept queries, O,
gate/up). A frozen weight (LoRA) drops its dW GEMM; rank-r adapter terms are
left out (r << d).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from centrifuge.models import get_preset  # noqa: E402


def layer_flops(c, keys: float, rho: float, frozen: bool = False) -> dict:
    """FLOPs per token of one decoder layer: forward, recompute (dense / compact), backward."""
    d, F, H, Hkv, D = c.hidden_size, c.intermediate_size, c.num_heads, c.num_kv_heads, c.head_dim
    g_q, g_kv, g_o, g_gu, g_d = 2 * d * H * D, 4 * d * Hkv * D, 2 * H * D * d, 4 * d * F, 2 * F * d
    gemm = g_q + g_kv + g_o + g_gu + g_d
    attn = 4 * H * D * keys
    w = 1 if frozen else 2  # dX (+ dW)
    return dict(
        forward=gemm + attn,
        recompute_dense=gemm + attn - g_d,
        recompute_compact=g_kv + rho * (g_q + attn + g_o + g_gu),
        backward_dense=w * gemm + 2.5 * attn,
        backward_compact=rho * w * gemm + (3 * rho + 4 * rho**2) / 5 * 2.5 * attn,
    )


def step_flops(c, tokens: int, keys: float, rho: float, frozen: bool = False) -> dict:
    """Whole-step FLOPs of the three runs the benchmark compares (LM head included)."""
    f = {k: v * c.num_layers * tokens for k, v in layer_flops(c, keys, rho, frozen).items()}
    head = 2 * c.hidden_size * c.vocab_size * tokens
    hw = 1 if frozen else 2
    dense_ckpt = f["forward"] + head + f["recompute_dense"] + f["backward_dense"] + hw * head
    compact = f["forward"] + head + f["backward_compact"] + rho * hw * head
    compact_ckpt = compact + f["recompute_compact"]
    dense = f["forward"] + head + f["backward_dense"] + hw * head
    return dict(dense=dense, dense_ckpt=dense_ckpt, centrifuge=compact, centrifuge_ckpt=compact_ckpt,
                backward_dense=f["backward_dense"] + hw * head,
                backward_compact=f["backward_compact"] + rho * hw * head)  # fmt: skip


SHAPES = [  # preset, batch, seq, LoRA (frozen base)
    ("tinyllama-1.1b", 2, 8192, False), ("tinyllama-1.1b", 1, 32768, False),
    ("llama3.2-3b", 1, 8192, False), ("llama3.2-3b", 8, 2048, True),
]  # fmt: skip


def predictions(rho: float) -> None:
    print(f"ρ = {rho}: predicted FLOP ratios (causal: c = L/2 keys per query)")
    print("| shape | cc/ac (Centrifuge+ckpt / dense+ckpt) | cc/c (ckpt cost) | backward c/a |")
    print("|---|---|---|---|")
    for preset, B, L, lora in SHAPES:
        s = step_flops(get_preset(preset), B * L, L / 2, rho, lora)
        name = f"{preset} {B}×{L}" + (" LoRA" if lora else "")
        print(f"| {name} | {s['centrifuge_ckpt'] / s['dense_ckpt']:.3f} | "
              f"{s['centrifuge_ckpt'] / s['centrifuge']:.3f} | "
              f"{s['backward_compact'] / s['backward_dense']:.3f} |")  # fmt: skip


def counted(rho: float) -> None:
    """Backward FLOPs counted by torch's FlopCounterMode on the CPU reference path,
    checkpointed minus not: the recompute, against the model with the reference's
    attention accounting (every query scores all L keys; the kept-query pass too)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from centrifuge.models import build_model

    c = get_preset("small")
    model = build_model(c, seed=0)
    B, L = 2, 128
    ids = torch.randint(0, c.vocab_size, (B, L), generator=torch.Generator().manual_seed(0))
    keep = torch.zeros(B, L, dtype=torch.bool)
    keep[:, : L - 1] = torch.rand(B, L - 1, generator=torch.Generator().manual_seed(1)) < rho
    n = int(keep.sum())
    for mode in ("amplified", "exact"):
        total = {}
        for ckpt in (False, True):
            (model.activation_checkpointing_enable if ckpt else model.activation_checkpointing_disable)()
            out = model(ids, labels=ids, backward=mode)
            loss = out.plan.loss(out.token_loss, keep)
            with FlopCounterMode(display=False) as fc:
                loss.backward()
            total[ckpt] = fc.get_total_flops()
            model.zero_grad(set_to_none=True)
        f = layer_flops(c, keys=L, rho=n / (B * L))
        key = "recompute_compact" if mode == "amplified" else "recompute_dense"
        want = f[key] * c.num_layers * B * L
        print(f"{mode}: recompute counted {total[True] - total[False]:.4g}, predicted {want:.4g} "
              f"({(total[True] - total[False]) / want:.4f}x)")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--count", action="store_true")
    p.add_argument("--rho", type=float, default=0.5)
    args = p.parse_args()
    # At ρ = 1 nothing filtered matters, the plan stays dense and every run is the
    # dense one (ratios 1): the compact formulas describe ρ < 1 only.
    predictions(args.rho)
    if args.count:
        counted(args.rho)
