"""GPU tests of the row-wise kernels (RMSNorm, SwiGLU, RoPE, LM head + CE) and
of a whole decoder layer on the kernel path (skipped without CUDA), and the
device benchmark: each kernel against the torch composition it replaces.

    python -m pytest tests/gpu/test_rowwise_gpu.py           # correctness, realistic shapes
    python3 tests/gpu/test_rowwise_gpu.py --bench OUT_DIR    # correctness + timings -> OUT_DIR

The reference is the plain PyTorch code of each op in float64 on upcast inputs
(the CPU path is that code). A kernel passes when its error is within the
dtype's tolerance and not much above the error of the torch composition run in
the same dtype (both round the same intermediates; the kernels keep float32
longer, so they are usually closer).
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

import centrifuge.ops.linear_ce as lce  # noqa: E402
import centrifuge.ops.rmsnorm as rms  # noqa: E402
import centrifuge.ops.rope as rope  # noqa: E402
import centrifuge.ops.swiglu as swi  # noqa: E402
from centrifuge.models.layer import LayerShape, decoder_layer  # noqa: E402
from centrifuge.ops.rowwise_dispatch import kernels_disabled  # noqa: E402
from centrifuge.plan import Layout, Plan  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

DEV = "cuda"
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
TOL = {torch.bfloat16: 2e-2, torch.float16: 4e-3, torch.float32: 1e-4}
# tinyllama-1.1b: d, F, H, Hkv, D, vocab; llama3.2-1b's vocabulary
TINYLLAMA = dict(d=2048, F=5632, H=32, Hkv=4, D=64, V=32000)
LLAMA32_VOCAB = 128256


def rel(a, b):
    a, b = a.detach().cpu().double(), b.detach().cpu().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def rnd(*shape, dtype, seed, scale=1.0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    return (torch.randn(*shape, device=DEV, generator=g) * scale).to(dtype)


def random_idx(N, ratio, seed):
    g = torch.Generator(device=DEV).manual_seed(seed)
    n = max(1, int(N * ratio))
    return torch.randperm(N, device=DEV, generator=g)[:n].sort().values


def check(name, ours, torch_path, ref, dtype, log=None, tol=None):
    """Kernel error vs reference, held to the dtype's tolerance and to ~the torch path's error."""
    e_k, e_t = rel(ours, ref), rel(torch_path, ref)
    ok = e_k < (tol or TOL[dtype]) and e_k <= 2 * e_t + 1e-6 and torch.isfinite(ours).all().item()
    if log is not None:
        log.append(dict(check=name, dtype=str(dtype), kernel_err=e_k, torch_err=e_t, ok=bool(ok)))
    assert ok, f"{name} {dtype}: kernel error {e_k:.2e}, torch composition {e_t:.2e}"


def _f64(*ts):
    return [t.double() for t in ts]


# --- per-op checks (bodies shared by pytest and the bench) --------------------------


def check_rmsnorm(dtype, N=4096, d=2048, ratio=0.5, seed=0, log=None):
    x, w = rnd(N, d, dtype=dtype, seed=seed, scale=2.0), rnd(d, dtype=dtype, seed=seed + 1)
    y, rstd = rms.rms_norm_forward(x, w, 1e-5)
    with kernels_disabled():
        y_t, rstd_t = rms.rms_norm_forward(x, w, 1e-5)
    y_r, rstd_r = rms.rms_norm_forward(*_f64(x, w), 1e-5)
    check("rmsnorm.forward", y, y_t, y_r, dtype, log)
    check("rmsnorm.rstd", rstd, rstd_t, rstd_r, dtype, log)
    idx = random_idx(N, ratio, seed + 2)
    n = idx.numel()
    dy, res = rnd(n, d, dtype=dtype, seed=seed + 3), rnd(n, d, dtype=dtype, seed=seed + 4)
    h = rms.rms_norm_apply_rows(x, rstd_t, w, idx)
    with kernels_disabled():
        h_t = rms.rms_norm_apply_rows(x, rstd_t, w, idx)
    check("rmsnorm.apply_rows", h, h_t, rms.rms_norm_apply(*_f64(x[idx], rstd_r[idx], w)), dtype, log)
    for scatter in (False, True):
        dx, dw = rms.rms_norm_backward_rows(dy, x, rstd_t, w, idx, res, scatter)
        with kernels_disabled():
            dx_t, dw_t = rms.rms_norm_backward_rows(dy, x, rstd_t, w, idx, res, scatter)
        dx_r, dw_r = rms.rms_norm_backward_rows(*_f64(dy, x, rstd_r, w), idx, res.double(), scatter)
        check(f"rmsnorm.backward_rows(scatter={scatter}).dx", dx, dx_t, dx_r, dtype, log)
        check(f"rmsnorm.backward_rows(scatter={scatter}).dw", dw, dw_t, dw_r, dtype, log)


def check_swiglu(dtype, N=4096, F=5632, ratio=0.5, seed=0, log=None):
    g, u = rnd(N, F, dtype=dtype, seed=seed, scale=2.0), rnd(N, F, dtype=dtype, seed=seed + 1)
    a = swi.swiglu_forward(g, u)
    with kernels_disabled():
        a_t = swi.swiglu_forward(g, u)
    check("swiglu.forward", a, a_t, swi.swiglu_reference(*_f64(g, u)), dtype, log)
    idx = random_idx(N, ratio, seed + 2)
    da = rnd(idx.numel(), F, dtype=dtype, seed=seed + 3)
    a_k, dgu = swi.swiglu_backward_rows(da, g, u, idx)
    with kernels_disabled():
        a_t, dgu_t = swi.swiglu_backward_rows(da, g, u, idx)
    a_r, dgu_r = swi.swiglu_backward_rows(*_f64(da, g, u), idx)
    check("swiglu.backward_rows.a", a_k, a_t, a_r, dtype, log)
    check("swiglu.backward_rows.dgu", dgu, dgu_t, dgu_r, dtype, log)


def check_rope(dtype, N=4096, H=32, D=64, ratio=0.5, seed=0, log=None):
    pos = torch.randint(0, 2048, (N,), device=DEV)
    cos, sin = rope.rope_cos_sin(pos, rope.inv_frequencies(D, 10000.0), dtype)
    x = rnd(N, H, D, dtype=dtype, seed=seed)
    y = rope.rope_forward(x, cos, sin)
    with kernels_disabled():
        y_t = rope.rope_forward(x, cos, sin)
    check("rope.forward", y, y_t, rope.rope_reference(*_f64(x, cos, sin)), dtype, log)
    idx = random_idx(N, ratio, seed + 1)
    dy = rnd(idx.numel(), H, D, dtype=dtype, seed=seed + 2)
    dx = rope.rope_backward_rows(dy, cos, sin, idx)
    with kernels_disabled():
        dx_t = rope.rope_backward_rows(dy, cos, sin, idx)
    check("rope.backward_rows", dx, dx_t, rope.rope_backward_rows(*_f64(dy, cos, sin), idx), dtype, log)


def check_linear_ce(dtype, N=2048, d=2048, V=32000, ratio=0.5, seed=0, log=None):
    x = rnd(N, d, dtype=dtype, seed=seed)
    w = rnd(V, d, dtype=dtype, seed=seed + 1, scale=0.05)
    t = torch.randint(0, V, (N,), device=DEV)
    t[::7] = -100
    loss, lse = lce.linear_cross_entropy_forward(x, w, t)
    with kernels_disabled():
        loss_t, lse_t = lce.linear_cross_entropy_forward(x, w, t)
    loss_r, lse_r = lce.linear_cross_entropy_forward(*_f64(x, w), t)
    check(f"linear_ce.forward(V={V}).loss", loss, loss_t, loss_r, dtype, log)
    check(f"linear_ce.forward(V={V}).lse", lse, lse_t, lse_r, dtype, log)
    idx = random_idx(N, ratio, seed + 2)
    dl = torch.rand(idx.numel(), device=DEV)
    args = (dl, x[idx], w, t[idx], lse_t[idx])
    dx, dw = lce.linear_cross_entropy_backward(*args)
    with kernels_disabled():
        dx_t, dw_t = lce.linear_cross_entropy_backward(*args)
    dx_r, dw_r = lce.linear_cross_entropy_backward(dl.double(), *_f64(x[idx], w), t[idx], lse_r[idx])
    check(f"linear_ce.backward(V={V}).dx", dx, dx_t, dx_r, dtype, log)
    check(f"linear_ce.backward(V={V}).dw", dw, dw_t, dw_r, dtype, log)


# --- a whole decoder layer ----------------------------------------------------------


def layer_inputs(B, L, dtype, seed, d, F, H, Hkv, D, qk_norm=False, bias=False, device=DEV):
    g = torch.Generator().manual_seed(seed)

    def p(*shape, scale=0.02):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    W = dict(
        input_norm=1 + p(d, scale=0.1), wq=p(H * D, d), wk=p(Hkv * D, d), wv=p(Hkv * D, d),
        wo=p(d, H * D), post_norm=1 + p(d, scale=0.1), wg=p(F, d), wu=p(F, d), wd=p(d, F),
    )  # fmt: skip
    if bias:
        W.update(bq=p(H * D), bk=p(Hkv * D), bv=p(Hkv * D))
    if qk_norm:
        W.update(q_norm=1 + p(D, scale=0.1), k_norm=1 + p(D, scale=0.1))
    x = p(B, L, d, scale=1.0)
    dy = p(B, L, d, scale=1.0)
    return x, dy, W


def run_layer(x, dy, W, B, L, H, Hkv, D, keep, retain=False):
    """Forward + backward of one layer; returns (y, {name: grad})."""
    layout = Layout.build(B, L, x.device)
    plan = Plan(layout)
    inv = rope.inv_frequencies(D, 10000.0)
    cos, sin = rope.rope_cos_sin(layout.position_ids, inv, x.dtype)
    x = x.detach().requires_grad_(True)
    Wg = {k: v.detach().requires_grad_(True) for k, v in W.items()}
    y = decoder_layer(x, cos, sin, plan, LayerShape(H, Hkv, D, 1e-5), Wg)
    if keep is not None:
        plan.keep_idx = torch.nonzero(keep.reshape(-1)).squeeze(1)  # any pattern, as the selection sets it
        dy = dy * keep[..., None]
    names = ["x", *Wg]
    grads = torch.autograd.grad(y, [x, *Wg.values()], dy, retain_graph=retain)
    return y, dict(zip(names, grads))


def check_layer(dtype, B=2, L=256, seed=0, log=None, qk_norm=False, bias=False, shape=TINYLLAMA):
    """Kernel path (CUDA, dtype) vs the CPU reference path (float32) of the same
    layer, at a kept pattern of about half the rows."""
    d, F, H, Hkv, D = (shape[k] for k in ("d", "F", "H", "Hkv", "D"))
    x, dy, W = layer_inputs(B, L, torch.float32, seed, d, F, H, Hkv, D, qk_norm, bias, device="cpu")
    keep = torch.rand(B, L, generator=torch.Generator().manual_seed(seed)) < 0.5
    _, g_ref = run_layer(x, dy, W, B, L, H, Hkv, D, keep)
    cast = {k: v.to(DEV, dtype) for k, v in W.items()}
    _, g = run_layer(x.to(DEV, dtype), dy.to(DEV, dtype), cast, B, L, H, Hkv, D, keep.to(DEV))
    with kernels_disabled():
        _, g_t = run_layer(x.to(DEV, dtype), dy.to(DEV, dtype), cast, B, L, H, Hkv, D, keep.to(DEV))
    tag = f"layer(qk_norm={qk_norm},bias={bias})"
    for k in g_ref:
        # A whole layer in half precision: bf16-level tolerance for both dtypes.
        check(f"{tag}.d{k}", g[k], g_t[k], g_ref[k], dtype, log, tol=3e-2)


# --- pytest entry points ------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_rmsnorm(dtype):
    check_rmsnorm(dtype, N=1531, d=2048)


@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu(dtype):
    check_swiglu(dtype, N=1531, F=5632)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [64, 128])
def test_rope(dtype, D):
    check_rope(dtype, N=1531, H=32 if D == 64 else 16, D=D)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("V", [32000, LLAMA32_VOCAB])
def test_linear_ce(dtype, V):
    check_linear_ce(dtype, N=1024, V=V)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("qk_norm,bias", [(False, False), (True, False), (False, True)])
def test_layer_kernel_path_vs_cpu_reference(dtype, qk_norm, bias):
    check_layer(dtype, qk_norm=qk_norm, bias=bias)


# --- the device benchmark -----------------------------------------------------------


def bench_main(out_dir):
    import triton

    os.makedirs(out_dir, exist_ok=True)
    log, rows, t0 = [], [], time.time()
    lines = []

    def say(*a):
        s = " ".join(str(x) for x in a)
        print(s, flush=True)
        lines.append(s)

    def ms(fn):
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")

    props = torch.cuda.get_device_properties(0)
    say(f"# device {props.name}, torch {torch.__version__}, triton {triton.__version__}")

    # 1. Correctness at realistic shapes, every dtype.
    failures = []
    checks = [
        ("rmsnorm", lambda dt: check_rmsnorm(dt, N=16384, log=log)),
        ("swiglu", lambda dt: check_swiglu(dt, N=8192, log=log)),
        ("rope64", lambda dt: check_rope(dt, N=16384, log=log)),
        ("rope128", lambda dt: check_rope(dt, N=8192, H=16, D=128, log=log)),
        ("lce32k", lambda dt: check_linear_ce(dt, N=4096, log=log)),
        ("lce128k", lambda dt: check_linear_ce(dt, N=2048, V=LLAMA32_VOCAB, log=log)),
        ("layer", lambda dt: check_layer(dt, log=log) if dt != torch.float32 else None),
        ("layer-qk", lambda dt: check_layer(dt, log=log, qk_norm=True) if dt == torch.bfloat16 else None),
        ("layer-bias", lambda dt: check_layer(dt, log=log, bias=True) if dt == torch.bfloat16 else None),
    ]
    for name, fn in checks:
        for dt in DTYPES:
            try:
                fn(dt)
            except AssertionError as e:
                failures.append(f"{name} {dt}: {e}")
                say("FAIL", name, dt, e)
            except Exception as e:  # a crash is a failure too; keep timing the rest
                failures.append(f"{name} {dt}: {type(e).__name__}: {e}")
                say("ERROR", name, dt, type(e).__name__, e)
    worst = {}
    for r in log:
        key = (r["check"].split("(")[0].split(".d")[0], r["dtype"])
        worst[key] = max(worst.get(key, (0, 0)), (r["kernel_err"], r["torch_err"]))
    say(f"## correctness: {len(log)} checks, {len(failures)} failures ({time.time() - t0:.0f}s)")
    for (k, dt), (ek, et) in sorted(worst.items()):
        say(f"  {k:28s} {dt:15s} kernel {ek:.2e}  torch {et:.2e}")

    # 2. Timings, tinyllama shapes, bf16: kernel vs the torch composition it replaces.
    dt = torch.bfloat16
    N, d, F, H, Hkv, D, V = 16384, *(TINYLLAMA[k] for k in ("d", "F", "H", "Hkv", "D", "V"))

    def timed(op, ratio, fn_kernel, fn_torch, note=""):
        tk = ms(fn_kernel)
        with kernels_disabled():
            tt = ms(fn_torch)
        rows.append(dict(op=op, ratio=ratio, kernel_ms=tk, torch_ms=tt, speedup=tt / tk, note=note))
        say(f"  {op:34s} rho={ratio:<4} kernel {tk:8.3f} ms  torch {tt:8.3f} ms  x{tt / tk:5.2f} {note}")

    say("## timings (bf16, N=16384, tinyllama widths)")
    x, w = rnd(N, d, dtype=dt, seed=1), rnd(d, dtype=dt, seed=2)
    _, rstd = rms.rms_norm_forward(x, w, 1e-5)
    timed("rmsnorm.forward", 1.0, lambda: rms.rms_norm_forward(x, w, 1e-5), lambda: rms.rms_norm_forward(x, w, 1e-5))
    g, u = rnd(N, F, dtype=dt, seed=3), rnd(N, F, dtype=dt, seed=4)
    timed("swiglu.forward", 1.0, lambda: swi.swiglu_forward(g, u), lambda: swi.swiglu_forward(g, u))
    pos = torch.arange(2048, device=DEV).repeat(N // 2048)
    cos, sin = rope.rope_cos_sin(pos, rope.inv_frequencies(D, 10000.0), dt)
    q = rnd(N, H, D, dtype=dt, seed=5)
    timed("rope.forward (q)", 1.0, lambda: rope.rope_forward(q, cos, sin), lambda: rope.rope_forward(q, cos, sin))
    for ratio in (0.5, 1.0):
        idx = random_idx(N, ratio, 7) if ratio < 1 else None
        n = N if idx is None else idx.numel()
        dy, res = rnd(n, d, dtype=dt, seed=8), rnd(n, d, dtype=dt, seed=9)
        timed("rmsnorm.apply_rows", ratio, lambda: rms.rms_norm_apply_rows(x, rstd, w, idx),
              lambda: rms.rms_norm_apply_rows(x, rstd, w, idx))  # fmt: skip
        timed("rmsnorm.backward_rows+res", ratio,
              lambda: rms.rms_norm_backward_rows(dy, x, rstd, w, idx, res),
              lambda: rms.rms_norm_backward_rows(dy, x, rstd, w, idx, res))  # fmt: skip
        timed("rmsnorm.backward_rows+res+scatter", ratio,
              lambda: rms.rms_norm_backward_rows(dy, x, rstd, w, idx, res, True),
              lambda: rms.rms_norm_backward_rows(dy, x, rstd, w, idx, res, True))  # fmt: skip
        da = rnd(n, F, dtype=dt, seed=10)
        timed("swiglu.backward_rows", ratio, lambda: swi.swiglu_backward_rows(da, g, u, idx),
              lambda: swi.swiglu_backward_rows(da, g, u, idx))  # fmt: skip
        dq = rnd(n, H, D, dtype=dt, seed=11)
        timed("rope.backward_rows (dq)", ratio, lambda: rope.rope_backward_rows(dq, cos, sin, idx),
              lambda: rope.rope_backward_rows(dq, cos, sin, idx))  # fmt: skip

    # Tuning probes: programs per SM of the RMSNorm backward's row loop.
    from centrifuge.ops import rowwise_dispatch as rd

    idx = random_idx(N, 0.5, 7)
    dy, res = rnd(idx.numel(), d, dtype=dt, seed=8), rnd(idx.numel(), d, dtype=dt, seed=9)
    for per_sm in (2, 4, 8, 2, 4, 8):  # twice: the spread between repeats is the noise
        rd.PROGRAMS_PER_SM["value"] = per_sm
        t_s = ms(lambda: rms.rms_norm_backward_rows(dy, x, rstd, w, idx, res, True))
        t_c = ms(lambda: rms.rms_norm_backward_rows(dy, x, rstd, w, idx, res))
        say(f"  probe rmsnorm.backward rho=0.5 programs/SM={per_sm}: scatter {t_s:.3f} ms, compact {t_c:.3f} ms")
        rows.append(dict(op="probe.rms_backward", per_sm=per_sm, scatter_ms=t_s, compact_ms=t_c))
    rd.PROGRAMS_PER_SM["value"] = 4

    # LM head + CE: forward over all rows, backward on kept rows.
    for vocab in (V, LLAMA32_VOCAB):
        wl = rnd(vocab, d, dtype=dt, seed=12, scale=0.02)
        t = torch.randint(0, vocab, (N,), device=DEV)
        _, lse = lce.linear_cross_entropy_forward(x, wl, t)
        flops = 2 * N * d * vocab
        timed(f"linear_ce.forward V={vocab}", 1.0, lambda: lce.linear_cross_entropy_forward(x, wl, t),
              lambda: lce.linear_cross_entropy_forward(x, wl, t),
              f"(GEMM alone {ms(lambda: x @ wl.t()):.3f} ms; {flops / 1e12:.2f} TFLOP)")  # fmt: skip
        for ratio in (0.5, 1.0):
            idx = random_idx(N, ratio, 13)
            xk, tk_, lk, dl = x[idx], t[idx], lse[idx], torch.rand(idx.numel(), device=DEV)
            timed(f"linear_ce.backward V={vocab}", ratio,
                  lambda: lce.linear_cross_entropy_backward(dl, xk, wl, tk_, lk),
                  lambda: lce.linear_cross_entropy_backward(dl, xk, wl, tk_, lk),
                  f"(3 GEMMs alone {3 * ms(lambda: xk @ wl.t()):.3f} ms)")  # fmt: skip
        # Tuning probe: logits chunk budget (bytes) of the kernel path.
        import centrifuge.ops.linear_ce_triton as lcet

        idx = random_idx(N, 0.5, 13)
        xk, tk_, lk, dl = x[idx], t[idx], lse[idx], torch.rand(idx.numel(), device=DEV)
        for budget in (2**28, 2**29, 2**30):
            tf = ms(lambda: lcet.linear_ce_forward_triton(x, wl, t, -100, budget))
            tb = ms(lambda: lcet.linear_ce_backward_triton(dl, xk, wl, tk_, lk, -100, budget))
            say(f"  probe linear_ce V={vocab} budget={budget >> 20} MiB: forward {tf:.3f} ms, backward rho=0.5 {tb:.3f} ms")
            rows.append(dict(op="probe.linear_ce_budget", vocab=vocab, budget=budget, fwd_ms=tf, bwd_ms=tb))
        # Tuning probe: the forward's row scan alone (one chunk of logits).
        logits = x[:2048] @ wl.t()
        lo, ls_ = torch.empty(2048, device=DEV), torch.empty(2048, device=DEV)
        for blk, warps in ((1024, 4), (2048, 8), (4096, 8), (8192, 16)):
            t_ = ms(lambda: lcet._ce_forward_kernel[(2048,)](
                logits, t, lo, ls_, vocab, logits.stride(0), -100, BLOCK=blk, num_warps=warps))  # fmt: skip
            gbps = 2048 * vocab * 2 / t_ / 1e6
            say(f"  probe linear_ce forward scan V={vocab} BLOCK={blk} warps={warps}: {t_:.3f} ms ({gbps:.0f} GB/s)")
            rows.append(dict(op="probe.ce_scan", vocab=vocab, block=blk, warps=warps, ms=t_))
        del logits
        del wl
    torch.cuda.empty_cache()

    # Final norm fused with the LM head vs the two Functions apart (kernels on).
    say("## final norm + LM head + CE, forward + backward, B=8, L=2048, V=32000")
    B, L = 8, 2048
    layout = Layout.build(B, L, DEV)
    xs = rnd(B, L, d, dtype=dt, seed=20).requires_grad_(True)
    nw = (1 + 0.1 * rnd(d, dtype=torch.float32, seed=21)).to(dt).requires_grad_(True)
    wl = rnd(V, d, dtype=dt, seed=22, scale=0.02).requires_grad_(True)
    tg = torch.randint(0, V, (B, L), device=DEV)
    keep_idx = random_idx(B * L, 0.5, 23)

    def head(fused):
        plan = Plan(layout)
        if fused:
            loss, _ = lce.norm_linear_cross_entropy(xs, nw, wl, tg, plan, 1e-5)
        else:
            h = rms.rms_norm(xs, nw, 1e-5, plan)
            loss = lce.linear_cross_entropy(h, wl, tg, plan)
        plan.keep_idx = keep_idx
        loss.sum().backward()
        xs.grad = nw.grad = wl.grad = None

    for fused in (True, False):
        t_ = ms(lambda: head(fused))
        rows.append(dict(op="norm+lm_head fwd+bwd rho=0.5", fused=fused, ms=t_))
        say(f"  fused={fused!s:5s} {t_:.3f} ms")
    del xs, wl
    torch.cuda.empty_cache()

    # A whole layer, forward and backward, kernel path vs torch path (same attention).
    say("## decoder layer (tinyllama, B=8, L=2048, bf16)")
    B, L = 8, 2048
    xl, dyl, Wl = layer_inputs(B, L, dt, 0, d, F, H, Hkv, D, device=DEV)
    for ratio in (0.5, None):  # None: dense (the plan of rho = 1 stays dense too)
        keep = None if ratio is None else (torch.rand(B, L, device=DEV) < ratio)
        label = "dense" if ratio is None else ratio
        for kernels in (True, False):
            ctx = kernels_disabled() if not kernels else _null()
            with ctx:
                layout = Layout.build(B, L, DEV)
                cos_l, sin_l = rope.rope_cos_sin(layout.position_ids, rope.inv_frequencies(D, 1e4), dt)
                xg = xl.detach().requires_grad_(True)
                Wg = {k: v.detach().requires_grad_(True) for k, v in Wl.items()}
                shape = LayerShape(H, Hkv, D, 1e-5)
                fwd = ms(lambda: decoder_layer(xg, cos_l, sin_l, Plan(layout), shape, Wg))
                plan = Plan(layout)
                y = decoder_layer(xg, cos_l, sin_l, plan, shape, Wg)
                dyk = dyl
                if keep is not None:
                    plan.keep_idx = torch.nonzero(keep.reshape(-1)).squeeze(1)
                    dyk = dyl * keep[..., None]
                inputs = [xg, *Wg.values()]
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                bwd = ms(lambda: torch.autograd.grad(y, inputs, dyk, retain_graph=True))
                peak = (torch.cuda.max_memory_allocated() - base) / 2**20
                del y, plan
            rows.append(dict(op="layer", ratio=label, kernels=kernels, fwd_ms=fwd, bwd_ms=bwd, bwd_extra_peak_mib=peak))
            say(f"  layer rho={label!s:5s} kernels={kernels!s:5s} forward {fwd:7.3f} ms  backward {bwd:7.3f} ms  backward transient {peak:7.0f} MiB")

    del xl, dyl, Wl
    torch.cuda.empty_cache()
    model_steps(say, rows)

    say(f"## done in {time.time() - t0:.0f}s; failures: {len(failures)}")
    with open(os.path.join(out_dir, "rowwise_bench.json"), "w") as f:
        json.dump(dict(device=props.name, torch=torch.__version__, triton=triton.__version__,
                       checks=log, failures=failures, timings=rows), f, indent=1)  # fmt: skip
    with open(os.path.join(out_dir, "rowwise_bench.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return 1 if failures else 0


def model_steps(say, rows, layers=4, B=8, L=2048):
    """tinyllama-1.1b cut to a few layers, bf16: dense (exact) and Centrifuge at
    rho = 0.5, whole step (forward + selection + backward), kernels on and off."""
    from centrifuge.models import build_model, get_preset
    from centrifuge.selection import Selector

    cfg = get_preset("tinyllama-1.1b")
    cfg.num_layers = layers
    model = build_model(cfg, dtype=torch.bfloat16, device=DEV, seed=0)
    ids = torch.randint(0, cfg.vocab_size, (B, L), device=DEV)
    say(f"## model step: tinyllama-1.1b, {layers} of 22 layers, B={B}, L={L}, bf16")

    def step(mode, ratio):
        out = model(ids, labels=ids, backward=mode)
        keep = out.valid if ratio is None else Selector("loss", ratio)(out.token_loss, out.valid)
        out.plan.loss(out.token_loss, keep).backward()
        model.zero_grad(set_to_none=True)

    def ms_step(fn, iters=10):
        for _ in range(3):
            fn()
        times = []
        for _ in range(iters):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        return sorted(times)[len(times) // 2]

    for kernels in (True, False):
        ctx = kernels_disabled() if not kernels else _null()
        with ctx:
            for mode, ratio in (("exact", None), ("amplified", 0.5)):
                torch.cuda.reset_peak_memory_stats()
                t = ms_step(lambda: step(mode, ratio))
                peak = torch.cuda.max_memory_allocated() / 2**30
                name = "dense" if ratio is None else f"centrifuge rho={ratio}"
                rows.append(dict(op="model_step", variant=name, kernels=kernels, step_ms=t, peak_gib=peak))
                say(f"  {name:22s} kernels={kernels!s:5s} step {t:8.2f} ms  peak {peak:6.2f} GiB")


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "--bench":
        sys.exit("usage: python3 tests/gpu/test_rowwise_gpu.py --bench OUT_DIR")
    sys.exit(bench_main(sys.argv[2]))
