"""GPU tests of the attention kernels (skipped without CUDA), and the device
benchmark of the filtered attention backward.

    python -m pytest tests/gpu/test_attention_gpu.py          # correctness, realistic shapes
    python3 tests/gpu/test_attention_gpu.py --bench OUT_DIR   # correctness + timings -> OUT_DIR

The reference is the plain PyTorch code of centrifuge.ops.attention in float32 on
upcast inputs; at 8k tokens per row (where the reference needs too much memory)
the Triton kernels are held to PyTorch's flash backward run densely on a
zero-filled dO and gathered at the kept rows, which is exact for the filtered
semantics (see attention_backward_flash_gather).
"""

from __future__ import annotations

import json
import os
import sys
import time

import pytest
import torch

if __name__ == "__main__":  # run from the repo root without installing
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from centrifuge.ops.attention import (  # noqa: E402
    attention_backward,
    attention_backward_reference,
    attention_forward,
    attention_forward_reference,
)
from centrifuge.plan import Layout  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

TOL = {torch.bfloat16: 2e-2, torch.float16: 5e-3}
DEVICE = "cuda"  # a CPU smoke run of the bench code may override it


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def packed_layout(B, L, seed, min_doc, max_doc, device=None):
    g = torch.Generator().manual_seed(seed)
    pos = []
    for _ in range(B):
        row = []
        while len(row) < L:
            row.extend(range(int(torch.randint(min_doc, max_doc + 1, (1,), generator=g))))
        pos.append(row[:L])
    return Layout.build(B, L, device or DEVICE, position_ids=torch.tensor(pos))


def make_inputs(B, L, H, Hkv, D, dtype, packed, seed):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    layout = packed_layout(B, L, seed, 1, L // 2) if packed else Layout.build(B, L, DEVICE)
    q = torch.randn(B, L, H, D, device=DEVICE, dtype=dtype, generator=g)
    k = torch.randn(B, L, Hkv, D, device=DEVICE, dtype=dtype, generator=g)
    v = torch.randn(B, L, Hkv, D, device=DEVICE, dtype=dtype, generator=g)
    return q, k, v, layout


def random_keep(N, ratio, seed):
    device = DEVICE
    g = torch.Generator(device=device).manual_seed(seed + 1000)
    n = round(ratio * N)
    return torch.randperm(N, device=device, generator=g)[:n].sort().values


def poison_allocator(*shapes_dtypes):
    """Fill freed blocks of the outputs' sizes with NaN so that a row a kernel
    fails to write shows up (the caching allocator hands these blocks out next)."""
    bufs = [torch.full(s, float("nan"), device=DEVICE, dtype=d) for s, d in shapes_dtypes]
    del bufs


# --------------------------------------------------------------------------- #
# Tests
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D,H,Hkv", [(64, 8, 2), (128, 4, 4)])
@pytest.mark.parametrize("packed", [False, True])
def test_flash_forward_matches_reference(dtype, D, H, Hkv, packed):
    q, k, v, layout = make_inputs(2, 777, H, Hkv, D, dtype, packed, seed=1)
    o, lse = attention_forward(q, k, v, layout)
    o_ref, lse_ref = attention_forward_reference(q.float(), k.float(), v.float(), layout)
    assert o.dtype == dtype and lse.dtype == torch.float32 and lse.shape == lse_ref.shape
    assert rel(o, o_ref) < TOL[dtype] and rel(lse, lse_ref) < 1e-3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D,H,Hkv", [(64, 8, 2), (128, 8, 4), (64, 4, 4)])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.5, 1.0, None])
def test_backward_matches_reference(dtype, D, H, Hkv, packed, ratio):
    B, L = 2, 1029
    q, k, v, layout = make_inputs(B, L, H, Hkv, D, dtype, packed, seed=2)
    o, lse = attention_forward(q, k, v, layout)
    keep_idx = None if ratio is None else random_keep(B * L, ratio, seed=3)
    n = B * L if keep_idx is None else keep_idx.numel()
    do = torch.randn(n, H, D, device="cuda", dtype=dtype)
    o_ref, lse_ref = attention_forward_reference(q.float(), k.float(), v.float(), layout)
    ref = attention_backward_reference(
        q.float(), k.float(), v.float(), o_ref, lse_ref, do.float(), layout, keep_idx
    )
    poison_allocator(((n, H, D), dtype), ((n, Hkv, D), dtype), ((n, Hkv, D), dtype))
    out = attention_backward(q, k, v, o, lse, do, layout, keep_idx)
    for name, a, b in zip(("dq", "dk", "dv"), out, ref):
        assert a.shape == b.shape and a.dtype == dtype, name
        if n == 0:
            continue
        assert torch.isfinite(a).all(), f"{name}: non-finite (unwritten?) values"
        assert rel(a, b) < TOL[dtype], f"{name}: relative error {rel(a, b):.2e}"


@pytest.mark.parametrize("B,L", [(8, 2048), (2, 8192)])
def test_triton_matches_flash_at_realistic_shapes(B, L):
    from centrifuge.ops.attention_triton import (
        attention_backward_flash_gather,
        attention_backward_triton,
    )

    H, Hkv, D, dtype = 32, 4, 64, torch.bfloat16
    q, k, v, layout = make_inputs(B, L, H, Hkv, D, dtype, packed=True, seed=4)
    o, lse = attention_forward(q, k, v, layout)
    keep_idx = random_keep(B * L, 0.5, seed=5)
    do = torch.randn(keep_idx.numel(), H, D, device="cuda", dtype=dtype)
    ours = attention_backward_triton(q, k, v, o, lse, do, layout, keep_idx)
    flash = attention_backward_flash_gather(q, k, v, o, lse, do, layout, keep_idx)
    for name, a, b in zip(("dq", "dk", "dv"), ours, flash):
        assert rel(a, b) < 1e-2, f"{name}: relative error {rel(a, b):.2e}"


# --------------------------------------------------------------------------- #
# Device benchmark
# --------------------------------------------------------------------------- #

SHAPES = [  # name, B, L, H, Hkv, D, packed
    ("tinyllama 8x2048", 8, 2048, 32, 4, 64, False),
    ("tinyllama 8x2048 packed", 8, 2048, 32, 4, 64, True),
    ("tinyllama 2x8192", 2, 8192, 32, 4, 64, False),
    ("D128 GQA 8x2048", 8, 2048, 32, 8, 128, False),
]
RATIOS = (0.3, 0.5, 0.7, 1.0)
BENCH_DTYPE = torch.bfloat16


def sweep_configs(D):
    from centrifuge.ops.attention_triton import BackwardConfig as C

    if D <= 64:
        return [C(64, 64, 4, 2, 32, 128, 4, 2), C(64, 64, 4, 2, 32, 128, 4, 2, kv_split=2),
                C(64, 64, 4, 2, 32, 128, 4, 2, kv_split=4),
                C(64, 64, 4, 2, 32, 128, 4, 2, kv_split=8, kv_atomic=False),
                C(64, 64, 4, 2, 32, 128, 8, 2), C(64, 64, 4, 2, 64, 128, 4, 2),
                C(64, 64, 8, 2, 32, 128, 4, 2), C(32, 64, 4, 2, 32, 128, 4, 2)]  # fmt: skip
    return [C(64, 64, 4, 2, 32, 64, 4, 2), C(64, 64, 4, 2, 32, 64, 4, 2, kv_split=1),
            C(64, 64, 4, 2, 32, 64, 4, 2, kv_split=4), C(64, 64, 4, 2, 32, 128, 8, 2),
            C(64, 32, 4, 2, 32, 64, 4, 2), C(64, 64, 8, 2, 32, 64, 4, 2)]  # fmt: skip


def causal_pairs(layout, keep_idx):
    """(query-key pairs a dQ pass visits, kept-kept pairs a dK/dV pass visits,
    all visible pairs) over the flat rows: for FLOP counts."""
    from centrifuge.ops.attention_triton import kept_row_bounds

    cu = layout.cu_seqlens.long()
    lens = cu[1:] - cu[:-1]
    dense = int((lens * (lens + 1) // 2).sum())
    if keep_idx is None:
        return dense, dense, dense
    b = kept_row_bounds(keep_idx, layout.cu_seqlens)
    dq_pairs = int((keep_idx - b.doc_start.long() + 1).sum())
    j = torch.arange(keep_idx.numel(), device=keep_idx.device)
    kv_pairs = int((b.kept_end.long() - j).sum())
    return dq_pairs, kv_pairs, dense


def kernel_split(fn, iters=10):
    """Per-kernel device time (us per call, mean over iters) from the profiler."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    out = {}
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if t > 0:
            out[e.key[:60]] = round(t / iters, 1)
    return out


def bench_main(out_dir):
    import triton
    from triton.testing import do_bench

    from centrifuge.ops import attention_triton as at

    os.makedirs(out_dir, exist_ok=True)
    log = open(os.path.join(out_dir, "attention_bench.log"), "w")

    def say(*a):
        s = " ".join(str(x) for x in a)
        print(s, flush=True)
        log.write(s + "\n")
        log.flush()

    def ms(fn):
        return do_bench(fn, warmup=25, rep=100, return_mode="median")

    info = dict(device=torch.cuda.get_device_name() if DEVICE == "cuda" else DEVICE, torch=torch.__version__,
                triton=triton.__version__, cuda=torch.version.cuda)  # fmt: skip
    say("# attention bench", json.dumps(info))
    results = dict(info=info, rows=[], sweep=[], errors=[])
    t_start = time.time()
    for name, B, L, H, Hkv, D, packed in SHAPES:
        dtype = BENCH_DTYPE
        N = B * L
        q, k, v, layout = make_inputs(B, L, H, Hkv, D, dtype, packed, seed=7)
        cu = layout.cu_seqlens
        try:
            raw = torch.ops.aten._flash_attention_forward(
                q.view(N, H, D), k.view(N, Hkv, D), v.view(N, Hkv, D), cu, cu,
                layout.max_seqlen, layout.max_seqlen, 0.0, True, False,
            )  # fmt: skip
            say(f"\n## {name}: flash varlen lse shape {tuple(raw[1].shape)}")
        except Exception as e:  # noqa: BLE001 - a report, not a check
            say(f"\n## {name}: flash varlen forward failed: {e}")
        o, lse = attention_forward(q, k, v, layout)
        t_fwd = ms(lambda: attention_forward(q, k, v, layout))
        do_full = torch.randn(N, H, D, device=DEVICE, dtype=dtype)
        t_flash_dense = ms(lambda: at.attention_backward_flash_dense(q, k, v, o, lse, do_full, layout))
        t_triton_dense = ms(lambda: at.attention_backward_triton(q, k, v, o, lse, do_full, layout, None))
        t_dispatch = ms(lambda: attention_backward(q, k, v, o, lse, do_full, layout, None))
        _, _, dense_pairs = causal_pairs(layout, None)
        fl = 2 * D * H
        dense_flop = 5 * fl * dense_pairs
        say(f"forward (flash varlen) {t_fwd:.3f} ms | dense backward: flash {t_flash_dense:.3f} ms "
            f"({dense_flop / t_flash_dense / 1e9:.0f} TFLOP/s), triton {t_triton_dense:.3f} ms "
            f"({dense_flop / t_triton_dense / 1e9:.0f} TFLOP/s), dispatch {t_dispatch:.3f} ms")  # fmt: skip
        # dense correctness: triton (all rows) vs flash
        a = at.attention_backward_triton(q, k, v, o, lse, do_full, layout, None)
        b = at.attention_backward_flash_dense(q, k, v, o, lse, do_full, layout)
        errs = [rel(x, y) for x, y in zip(a, b)]
        say(f"dense triton vs flash rel err dq/dk/dv: {' '.join(f'{e:.1e}' for e in errs)}")
        results["errors"].append(dict(shape=name, ratio="dense", vs="flash", err=errs))
        for ratio in RATIOS:
            keep_idx = random_keep(N, ratio, seed=8)
            n = keep_idx.numel()
            do = torch.randn(n, H, D, device=DEVICE, dtype=dtype)
            ours = at.attention_backward_triton(q, k, v, o, lse, do, layout, keep_idx)
            flash = at.attention_backward_flash_gather(q, k, v, o, lse, do, layout, keep_idx)
            errs = [rel(x, y) for x, y in zip(ours, flash)]
            check = dict(shape=name, ratio=ratio, vs="flash_gather", err=errs)
            if L <= 2048 and ratio < 1:  # the fp32 reference fits in memory here
                o32, lse32 = attention_forward_reference(q.float(), k.float(), v.float(), layout)
                ref = attention_backward_reference(
                    q.float(), k.float(), v.float(), o32, lse32, do.float(), layout, keep_idx
                )
                check["err_vs_fp32_reference"] = [rel(x, y) for x, y in zip(ours, ref)]
                check["flash_gather_vs_fp32_reference"] = [rel(x, y) for x, y in zip(flash, ref)]
                del o32, lse32, ref
            results["errors"].append(check)
            say(f"rho={ratio}: errors {json.dumps({k_: v_ for k_, v_ in check.items() if k_.startswith('err') or k_.startswith('flash')})}")
            t_tri = ms(lambda: at.attention_backward_triton(q, k, v, o, lse, do, layout, keep_idx))
            t_gather = ms(lambda: at.attention_backward_flash_gather(q, k, v, o, lse, do, layout, keep_idx))
            split = kernel_split(lambda: at.attention_backward_triton(q, k, v, o, lse, do, layout, keep_idx))
            dq_pairs, kv_pairs, _ = causal_pairs(layout, keep_idx)
            flop = 3 * fl * dq_pairs + 4 * fl * kv_pairs
            row = dict(shape=name, ratio=ratio, n_keep=n, fwd_ms=t_fwd, flash_dense_ms=t_flash_dense,
                       triton_dense_ms=t_triton_dense, triton_ms=t_tri, flash_gather_ms=t_gather,
                       triton_over_flash_dense=t_tri / t_flash_dense,
                       flop_ratio_vs_dense=flop / dense_flop,
                       triton_tflops=flop / t_tri / 1e9, kernels_us=split)  # fmt: skip
            results["rows"].append(row)
            say(f"rho={ratio}: triton {t_tri:.3f} ms = {t_tri / t_flash_dense:.2f} x flash dense "
                f"(flop ratio {flop / dense_flop:.2f}, {flop / t_tri / 1e9:.0f} TFLOP/s) | "
                f"flash+gather {t_gather:.3f} ms | kernels {split}")  # fmt: skip
            if ratio == 0.5 and name != "tinyllama 8x2048 packed":
                for cfg in sweep_configs(D):
                    try:
                        fn = lambda: at.attention_backward_triton(  # noqa: E731
                            q, k, v, o, lse, do, layout, keep_idx, config=cfg)
                        t = ms(fn)
                        sp = kernel_split(fn, iters=5)
                        err = [rel(x, y) for x, y in zip(fn(), flash)]
                    except Exception as e:  # out of shared memory, etc.: record, go on
                        t, sp, err = None, {}, str(e)[:200]
                    results["sweep"].append(dict(shape=name, config=cfg.__dict__, ms=t, kernels_us=sp, err=err))
                    cfg_s = tuple(cfg.__dict__.values())
                    if t is None:
                        say(f"  sweep {cfg_s}: failed: {err}")
                    else:
                        say(f"  sweep {cfg_s}: {t:.3f} ms, max err {max(err):.1e}, kernels {sp}")
            del ours, flash
        if name == "tinyllama 8x2048":
            keep_idx = random_keep(N, 0.5, seed=8)
            do = torch.randn(keep_idx.numel(), H, D, device=DEVICE, dtype=dtype)
            t_ref = ms(lambda: attention_backward_reference(q, k, v, o, lse, do, layout, keep_idx))
            say(f"reference (plain PyTorch, bf16) rho=0.5: {t_ref:.2f} ms")
            results["reference_ms_rho_0.5"] = t_ref
        del q, k, v, o, lse, do_full
        torch.cuda.empty_cache()
        say(f"(elapsed {time.time() - t_start:.0f} s)")
    with open(os.path.join(out_dir, "attention_bench.json"), "w") as f:
        json.dump(results, f, indent=1)
    say("\n| shape | rho | triton ms | flash dense ms | triton/flash | flop ratio | TFLOP/s | flash+gather ms |")
    say("|---|---|---|---|---|---|---|---|")
    for r in results["rows"]:
        say(f"| {r['shape']} | {r['ratio']} | {r['triton_ms']:.3f} | {r['flash_dense_ms']:.3f} | "
            f"{r['triton_over_flash_dense']:.2f} | {r['flop_ratio_vs_dense']:.2f} | "
            f"{r['triton_tflops']:.0f} | {r['flash_gather_ms']:.3f} |")  # fmt: skip


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "--bench":
        bench_main(sys.argv[2])
    else:
        sys.exit(pytest.main([__file__, "-q", "-x"]))
