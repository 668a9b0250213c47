"""Device probe for the whole-step levers (docs/kernels.md, "Whole step").

    python3 scripts/step_perf_probe.py OUT_DIR [--quick]

1. attention forwards at tinyllama / D128 shapes: flash varlen (contiguous and
   column views of a fused QKV buffer), cuDNN (batched, GQA native or expanded,
   varlen), mem-efficient; correctness of o and lse against flash, timings;
2. GEMM structure: separate vs concatenated QKV / gate-up projections, forward
   and the backward's dX GEMMs, with the weight concatenation counted;
3. the whole tinyllama-1.1b step (8 x 2048, bf16) under each structure switch:
   dense and Centrifuge at rho 0.5 / 1.0, CUDA events, median of repeats; the
   gradients of the final structure against the committed one;
4. the backward's timeline: wall vs summed kernel time vs busy time, the largest
   idle gaps and what precedes them; host syncs caught by the sync debug mode.
Writes OUT_DIR/probe.json (and a trace); prints a summary table last.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import triton  # noqa: E402

import centrifuge.models.layer as layer_mod  # noqa: E402
import centrifuge.ops.attention as attn  # noqa: E402
from centrifuge.ops import attention_triton as at  # noqa: E402
from centrifuge.plan import Layout  # noqa: E402

OUT = sys.argv[1] if len(sys.argv) > 1 else "/tmp/probe"
QUICK = "--quick" in sys.argv
RESULT: dict = {}
LINES: list[str] = []


def say(*a):
    s = " ".join(str(x) for x in a)
    print(s, flush=True)
    LINES.append(s)


def ms(fn):
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def save():
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "probe.json"), "w") as f:
        json.dump(RESULT, f, indent=1, default=str)
    with open(os.path.join(OUT, "summary.txt"), "w") as f:
        f.write("\n".join(LINES) + "\n")


# --------------------------------------------------------------------------- #
# 1. attention forwards
# --------------------------------------------------------------------------- #


def probe_attention():
    rows = []
    shapes = [("tinyllama 8x2048", 8, 2048, 32, 4, 64), ("tinyllama 2x8192", 2, 8192, 32, 4, 64),
              ("D128 GQA 8x2048", 8, 2048, 32, 8, 128)]  # fmt: skip
    dt = torch.bfloat16
    for name, B, L, H, Hkv, D in shapes:
        N = B * L
        g = torch.Generator(device="cuda").manual_seed(0)
        buf = torch.randn(N, (H + 2 * Hkv) * D, device="cuda", dtype=dt, generator=g)
        q = buf[:, : H * D].view(B, L, H, D)
        k = buf[:, H * D : (H + Hkv) * D].view(B, L, Hkv, D)
        v = buf[:, (H + Hkv) * D :].view(B, L, Hkv, D)
        qc, kc, vc = q.contiguous(), k.contiguous(), v.contiguous()
        layout = Layout.build(B, L, "cuda")
        o_ref, lse_ref = at.attention_forward_flash(qc, kc, vc, layout)
        flops = 4 * B * H * D * L * (L + 1) / 2  # causal: 2 matmuls, visible pairs

        def expand(fn):
            def run():
                old = at.CUDNN_EXPAND_KV
                at.CUDNN_EXPAND_KV = True
                try:
                    return fn()
                finally:
                    at.CUDNN_EXPAND_KV = old

            return run

        cu = layout.cu_seqlens

        def cudnn_varlen(qq, kk, vv):
            out, lse, *_ = torch.ops.aten._cudnn_attention_forward(
                qq.reshape(N, H, D), kk.reshape(N, Hkv, D), vv.reshape(N, Hkv, D), None, cu, cu,
                L, L, True, 0.0, True, False, scale=None,
            )  # fmt: skip
            return out, lse

        def efficient(qq, kk, vv):
            G = H // Hkv
            kk, vv = kk.repeat_interleave(G, dim=2), vv.repeat_interleave(G, dim=2)
            out, lse, *_ = torch.ops.aten._efficient_attention_forward(
                qq, kk, vv, None, None, None, None, None, 0.0, 1, True, scale=None
            )
            return out, lse

        variants = [
            ("flash contiguous", lambda: at.attention_forward_flash(qc, kc, vc, layout)),
            ("flash strided", lambda: at.attention_forward_flash(q, k, v, layout)),
            ("cudnn strided", lambda: at.attention_forward_cudnn(q, k, v, layout)),
            ("cudnn contiguous", lambda: at.attention_forward_cudnn(qc, kc, vc, layout)),
            ("cudnn expanded kv", expand(lambda: at.attention_forward_cudnn(q, k, v, layout))),
            ("cudnn varlen", lambda: cudnn_varlen(qc, kc, vc)),
            ("mem-efficient (kv expanded)", lambda: efficient(qc, kc, vc)),
        ]
        for vname, fn in variants:
            row = dict(shape=name, variant=vname)
            try:
                o, lse = fn()
                torch.cuda.synchronize()
                row["o_shape"], row["o_stride"] = tuple(o.shape), tuple(o.stride())
                row["lse_shape"], row["lse_stride"] = tuple(lse.shape), tuple(lse.stride())
                row["lse_dtype"] = str(lse.dtype)
                o4 = o.reshape(B, L, H, D) if o.dim() != 4 or o.shape[1] == L else o.transpose(1, 2)
                row["o_err"] = rel(o4, o_ref)
                lb = lse
                if lb.shape == (B, H, L, 1):
                    lb = lb[..., 0]
                if lb.shape == (H, N):
                    lb = lb.view(H, B, L).permute(1, 0, 2)
                if lb.shape == (N, H):
                    lb = lb.view(B, L, H).permute(0, 2, 1)
                if lb.dim() == 3 and lb.shape[:2] == (B, H) and lb.shape[2] >= L:
                    lb = lb[..., :L]
                row["lse_err"] = rel(lb, lse_ref) if lb.shape == lse_ref.shape else "layout?"
                t = ms(fn)
                row["ms"], row["tflops"] = t, flops / t / 1e9
            except Exception as e:  # record and go on: a backend may reject a layout
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            rows.append(row)
            err = row.get("error")
            say(f"  attn {name:18s} {vname:28s} " + (f"ERROR {err}" if err else
                f"{row['ms']:.3f} ms {row['tflops']:.0f} TF/s o_err {row['o_err']:.1e} "
                f"lse_err {row['lse_err'] if isinstance(row['lse_err'], str) else format(row['lse_err'], '.1e')} "
                f"lse {row['lse_shape']} {row['lse_stride']} o {row['o_stride']}"))  # fmt: skip
        # The filtered backward fed by cuDNN's outputs, against the same fed by flash's.
        try:
            keep_idx = torch.nonzero(torch.rand(N, device="cuda", generator=g) < 0.5).squeeze(1)
            do = torch.randn(keep_idx.numel(), H, D, device="cuda", dtype=dt, generator=g)
            o1, l1 = at.attention_forward_cudnn(q, k, v, layout)
            ref = at.attention_backward_triton(qc, kc, vc, o_ref, lse_ref, do, layout, keep_idx)
            ours = at.attention_backward_triton(q, k, v, o1, l1, do, layout, keep_idx)
            errs = {n_: rel(a, b) for n_, a, b in zip(("dq", "dk", "dv"), ours, ref)}
            tb = ms(lambda: at.attention_backward_triton(q, k, v, o1, l1, do, layout, keep_idx))
            tb0 = ms(lambda: at.attention_backward_triton(qc, kc, vc, o_ref, lse_ref, do, layout, keep_idx))
            rows.append(dict(shape=name, variant="triton bwd 0.5 from cudnn vs flash", errs=errs,
                             ms_strided_cudnn=tb, ms_contig_flash=tb0))  # fmt: skip
            say(f"  attn {name:18s} bwd rho .5 (cudnn fwd, strided) {tb:.3f} ms vs {tb0:.3f} ms; errs {errs}")
        except Exception as e:
            say(f"  attn {name} bwd from cudnn ERROR {type(e).__name__}: {str(e)[:300]}")
    RESULT["attention"] = rows
    save()


# --------------------------------------------------------------------------- #
# 2. GEMM structure
# --------------------------------------------------------------------------- #


def probe_gemms():
    dt = torch.bfloat16
    N, d, HD, KV, F = 16384, 2048, 2048, 256, 5632
    g = torch.Generator(device="cuda").manual_seed(1)

    def r(*s):
        return torch.randn(*s, device="cuda", dtype=dt, generator=g) * 0.02

    h = r(N, d)
    wq, wk, wv, wg, wu = r(HD, d), r(KV, d), r(KV, d), r(F, d), r(F, d)
    wqkv = torch.cat([wq, wk, wv])
    wgu = torch.cat([wg, wu])
    rows = {}
    rows["fwd qkv: 3 GEMMs"] = ms(lambda: (h @ wq.t(), h @ wk.t(), h @ wv.t()))
    rows["fwd qkv: cat + 1 GEMM"] = ms(lambda: h @ torch.cat([wq, wk, wv]).t())
    rows["fwd qkv: 1 GEMM (no cat)"] = ms(lambda: h @ wqkv.t())
    rows["fwd qkv: q + cat(kv) GEMM"] = ms(lambda: (h @ wq.t(), h @ torch.cat([wk, wv]).t()))
    rows["cat qkv weights"] = ms(lambda: torch.cat([wq, wk, wv]))
    rows["fwd gate/up: 2 GEMMs"] = ms(lambda: (h @ wg.t(), h @ wu.t()))
    rows["fwd gate/up: cat + 1 GEMM"] = ms(lambda: h @ torch.cat([wg, wu]).t())
    rows["fwd gate/up: 1 GEMM (no cat)"] = ms(lambda: h @ wgu.t())
    rows["cat gate/up weights"] = ms(lambda: torch.cat([wg, wu]))
    for n in (8192, 16384):
        dqkv = r(n, HD + 2 * KV)
        dgu = r(n, 2 * F)

        def three():
            x = dqkv[:, :HD] @ wq
            x = torch.addmm(x, dqkv[:, HD : HD + KV], wk)
            return torch.addmm(x, dqkv[:, HD + KV :], wv)

        rows[f"bwd dh1 n={n}: mm + 2 addmm"] = ms(three)
        rows[f"bwd dh1 n={n}: cat + 1 GEMM"] = ms(lambda: dqkv @ torch.cat([wq, wk, wv]))
        rows[f"bwd dh2 n={n}: mm + addmm"] = ms(lambda: torch.addmm(dgu[:, :F] @ wg, dgu[:, F:], wu))
        rows[f"bwd dh2 n={n}: cat + 1 GEMM"] = ms(lambda: dgu @ torch.cat([wg, wu]))
    for k_, t in rows.items():
        say(f"  gemm {k_:36s} {t:.4f} ms")
    RESULT["gemms"] = rows
    save()


# --------------------------------------------------------------------------- #
# 3. whole step, 4. backward timeline
# --------------------------------------------------------------------------- #

CONFIGS = {  # name: (fused_qkv, fused_gate_up, forward backend)
    "committed": (False, False, "flash"),
    "qkv": (True, False, "flash"),
    "cudnn": (False, False, "cudnn"),
    "qkv+cudnn": (True, False, "cudnn"),
    "qkv+gu+cudnn": (True, True, "cudnn"),
}
if "--final" in sys.argv:  # the second run: the chosen defaults against the start and one variant
    CONFIGS = {"committed": (False, False, "flash"), "qkv+cudnn": (True, False, "cudnn"),
               "qkv+gu+cudnn": (True, True, "cudnn")}  # fmt: skip


def set_config(name):
    fq, fg, be = CONFIGS[name]
    layer_mod.PERF["fused_qkv"], layer_mod.PERF["fused_gate_up"] = fq, fg
    attn.FORWARD_BACKEND = be


def probe_step():
    from centrifuge.models import build_model, get_preset
    from centrifuge.selection import Selector

    cfg = get_preset("tinyllama-1.1b")
    model = build_model(cfg, dtype=torch.bfloat16, device="cuda", seed=0)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (8, 2048), generator=g).cuda()

    def loss_fn(mode, ratio):
        out = model(ids, labels=ids, backward="exact" if mode == "dense" else "amplified")
        keep = out.valid if mode == "dense" else Selector("loss", ratio)(out.token_loss, out.valid)
        return out.plan.loss(out.token_loss, keep)

    def step(mode, ratio):
        e0, e1, e2 = (torch.cuda.Event(enable_timing=True) for _ in range(3))
        e0.record()
        loss = loss_fn(mode, ratio)
        e1.record()
        loss.backward()
        e2.record()
        e2.synchronize()
        model.zero_grad(set_to_none=True)
        return e0.elapsed_time(e1), e1.elapsed_time(e2), loss.item()

    jobs = [("dense", 1.0), ("centrifuge", 0.5), ("centrifuge", 1.0)]
    samples = {(c, m, r): [] for c in CONFIGS for m, r in jobs}
    losses = {}
    rounds = 2 + (3 if QUICK else 8 if "--final" in sys.argv else 6)
    for i in range(rounds):
        for c in CONFIGS:
            set_config(c)
            for m, r in jobs:
                f, b, lv = step(m, r)
                losses[(c, m, r)] = lv
                if i >= 2:
                    samples[(c, m, r)].append((f, b))
    table = []
    for c in CONFIGS:
        for m, r in jobs:
            s = samples[(c, m, r)]
            row = dict(config=c, mode=m, ratio=r, fwd=statistics.median(x for x, _ in s),
                       bwd=statistics.median(y for _, y in s), step=statistics.median(x + y for x, y in s),
                       loss=losses[(c, m, r)])  # fmt: skip
            table.append(row)
    by = {(t["config"], t["mode"], t["ratio"]): t for t in table}
    say("## whole step, tinyllama-1.1b 8x2048 bf16 (ms, medians)")
    for c in CONFIGS:
        d, c5, c1 = by[(c, "dense", 1.0)], by[(c, "centrifuge", 0.5)], by[(c, "centrifuge", 1.0)]
        say(f"  {c:14s} dense {d['step']:7.1f} (f {d['fwd']:5.1f} b {d['bwd']:6.1f}) | rho.5 {c5['step']:6.1f} "
            f"(f {c5['fwd']:5.1f} b {c5['bwd']:5.1f}) = {c5['step'] / d['step']:.3f}x, bwd {c5['bwd'] / d['bwd']:.3f}x"
            f" | rho1 {c1['step']:6.1f} = {c1['step'] / d['step']:.3f}x | loss {c5['loss']:.4f}")  # fmt: skip
    RESULT["step"] = table
    save()

    # Gradients of the candidate structure vs the committed one: same ids and the
    # same kept rows (a selection by loss would pick other rows after any rounding change).
    set_config("committed")
    with torch.no_grad():
        o0 = model(ids, labels=ids)
    fixed_keep = Selector("loss", 0.5)(o0.token_loss, o0.valid)
    del o0

    def grads(c):
        set_config(c)
        out = model(ids, labels=ids)
        out.plan.loss(out.token_loss, fixed_keep).backward()
        out = {n: p.grad.float().clone() for n, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)
        return out

    g0 = grads("committed")
    for c in [c for c in CONFIGS if c != "committed"]:
        g1 = grads(c)
        errs = sorted((rel(g1[n], g0[n]), n) for n in g0 if g0[n].norm() > 0)
        worst, median = errs[-1], errs[len(errs) // 2]
        say(f"  grads {c} vs committed (same kept rows): worst relative error {worst[0]:.2e} ({worst[1]}),"
            f" median {median[0]:.2e}")  # fmt: skip
        RESULT[f"grad_err_{c}"] = errs[-10:]

    # Peak memory per config (rho 0.5 and dense).
    for c in ("committed", "qkv+cudnn"):
        set_config(c)
        for m, r in (("dense", 1.0), ("centrifuge", 0.5)):
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            loss_fn(m, r).backward()
            torch.cuda.synchronize()
            peak = (torch.cuda.max_memory_allocated() - base) / 2**30
            model.zero_grad(set_to_none=True)
            say(f"  peak extra {c} {m} {r}: {peak:.2f} GiB (+ weights {sum(p.numel() * 2 for p in model.parameters()) / 2**30:.2f})")
            RESULT[f"peak_{c}_{m}_{r}"] = peak
    save()

    # 4. timeline of one backward at rho 0.5, and host syncs.
    from torch.profiler import ProfilerActivity, profile

    for c in ("committed", "qkv+cudnn"):
        set_config(c)
        loss = loss_fn("centrifuge", 0.5)
        torch.cuda.synchronize()
        e1, e2 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            e1.record()
            loss.backward()
            e2.record()
            torch.cuda.synchronize()
        model.zero_grad(set_to_none=True)
        wall = e1.elapsed_time(e2)
        kern = []
        for ev in prof.events():
            if ev.device_type == torch.autograd.DeviceType.CUDA:
                tr = ev.time_range
                kern.append((tr.start, tr.end, ev.name))
        kern.sort()
        busy, last_end, gaps, total = 0.0, None, [], 0.0
        for s, e, n in kern:
            total += e - s
            if last_end is None or s > last_end:
                if last_end is not None:
                    gaps.append((s - last_end, prev_name[:60], n[:60]))
                busy += e - s
                last_end = e
            elif e > last_end:
                busy += e - last_end
                last_end = e
            prev_name = n
        span = (kern[-1][1] - kern[0][0]) / 1e3 if kern else 0
        gaps.sort(reverse=True)
        gap_sum = sum(x for x, *_ in gaps) / 1e3
        say(f"  timeline {c}: wall {wall:.1f} ms, kernels {len(kern)}, first-to-last {span:.1f} ms, busy {busy / 1e3:.1f} ms,"
            f" summed {total / 1e3:.1f} ms, idle gaps {gap_sum:.1f} ms ({sum(1 for x in gaps if x[0] > 20)} > 20us)")  # fmt: skip
        small = {}
        for x, a, b in gaps:
            key = b[:40]
            small[key] = small.get(key, 0) + x
        top_after = sorted(small.items(), key=lambda kv: -kv[1])[:12]
        say("    idle before (us, summed by next kernel): " + "; ".join(f"{k} {v:.0f}" for k, v in top_after))
        say("    largest gaps (us): " + "; ".join(f"{x:.0f} [{a} -> {b}]" for x, a, b in gaps[:8]))
        by_name = {}
        for s_, e_, n_ in kern:
            by_name[n_[:70]] = by_name.get(n_[:70], 0.0) + (e_ - s_) / 1e3
        top = sorted(by_name.items(), key=lambda kv: -kv[1])[:25]
        say("    kernel time by name (ms): " + "; ".join(f"{k} {v:.2f}" for k, v in top))
        RESULT[f"kernels_{c}"] = top
        RESULT[f"timeline_{c}"] = dict(wall=wall, busy=busy / 1e3, summed=total / 1e3, gaps=gaps[:60],
                                       idle_by_next=top_after, n_kernels=len(kern))  # fmt: skip
        if c == "qkv+cudnn" and "--final" not in sys.argv:
            try:
                prof.export_chrome_trace(os.path.join(OUT, "bwd_trace.json"))
                os.system(f"gzip -f {os.path.join(OUT, 'bwd_trace.json')}")
            except Exception as e:
                say("trace export failed", e)
        # Host syncs inside the backward (and the forward, for information).
        for part in ("forward", "backward"):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                if part == "forward":
                    torch.cuda.set_sync_debug_mode(1)
                loss = loss_fn("centrifuge", 0.5)
                torch.cuda.set_sync_debug_mode(1)
                loss.backward()
                torch.cuda.set_sync_debug_mode(0)
            model.zero_grad(set_to_none=True)
            msgs = {}
            for w in caught:
                key = str(w.message).split("\n")[0][:100]
                msgs[key] = msgs.get(key, 0) + 1
            say(f"    syncs ({c}, forward+{part} window): {sum(msgs.values())} " + json.dumps(msgs)[:600])
            RESULT[f"syncs_{c}_{part}"] = msgs
    save()


def main():
    t0 = time.time()
    props = torch.cuda.get_device_properties(0)
    say(f"# {props.name}, torch {torch.__version__}, triton {triton.__version__}, cudnn {torch.backends.cudnn.version()}")
    parts = [("attention", probe_attention), ("gemms", probe_gemms), ("step", probe_step)]
    for name, fn in parts[2:] if "--final" in sys.argv else parts:
        try:
            fn()
        except Exception as e:
            import traceback

            say(f"PROBE {name} FAILED: {type(e).__name__}: {e}")
            traceback.print_exc()
        say(f"# {name} done at {time.time() - t0:.0f}s")
        save()


if __name__ == "__main__":
    main()
