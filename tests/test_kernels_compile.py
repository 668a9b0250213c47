"""Every Triton kernel compiles for the GPUs we measure on (sm_90: H100, H200)
on a machine without one: Triton ships ptxas, so a kernel change that only a
GPU compile would reject (types, layouts, register or shared-memory limits)
fails here, in CI, before device time is spent on it. Correctness stays with
the interpreter tests (tests/test_attention_triton.py and the others) and
tests/gpu.

The test session runs Triton's interpreter (tests/conftest.py), whose kernels
cannot be compiled, so the compile runs in a subprocess: this file, as a script."""

import json
import os
import subprocess
import sys

import pytest

# Pointer arguments by name and element type; the other non-constexpr arguments
# are int32 sizes and strides, except the float scalars.
I64 = ("KEEP", "KEYS", "IDX", "INV", "T")
I32 = ("DOC_START", "KEPT_END", "KEY_END", "QFIRST", "ORDER")
F32 = ("LSE", "LSEK", "DELTA", "RSTD", "LOSS", "SCALE", "DWP")
FLOATS = ("qk_scale", "sm_scale", "eps")
# Upper-case names that are sizes, not pointers, by kernel family.
SIZES = {"_ce_": ("V",), "_rms_": ("D",), "_swiglu_": ("F",), "": ("L",)}


def cases(dtype: str):
    """(kernel, constexpr values) for every kernel and the variants we launch
    with ``dtype`` inputs (bf16 attention runs its dots in tf32, fp32 in ieee)."""
    import torch

    from centrifuge.ops import attention_recompute_triton as ar
    from centrifuge.ops import attention_triton as at
    from centrifuge.ops import linear_ce_triton as ce
    from centrifuge.ops import rmsnorm_triton as rms
    from centrifuge.ops import rope_triton as rope
    from centrifuge.ops import swiglu_triton as sw

    out = []
    for d in (64, 128):  # the tiles and launch options attention_triton uses
        cfg = at.default_config(d, torch.bfloat16 if dtype == "bf16" else torch.float32)
        common = dict(D=d, BLOCK_D=d, GROUPS=2, PREC="tf32" if dtype == "bf16" else "ieee")
        dq = dict(common, BLOCK_M=cfg.dq_block_m, BLOCK_N=cfg.dq_block_n,
                  num_warps=cfg.dq_warps, num_stages=cfg.dq_stages)  # fmt: skip
        kv = dict(common, H=16, BLOCK_M=cfg.kv_block_m, BLOCK_N=cfg.kv_block_n,
                  num_warps=cfg.kv_warps, num_stages=cfg.kv_stages)  # fmt: skip
        out += [(at._dq_kernel, dict(dq, H=16)), (ar._o_kernel, dq),
                (at._dkdv_kernel, dict(kv, SPLIT=2, ATOMIC=True, KEYS_KEPT=True)),
                (at._dkdv_kernel, dict(kv, SPLIT=1, ATOMIC=False, KEYS_KEPT=True)),
                (at._dkdv_kernel, dict(kv, SPLIT=2, ATOMIC=True, KEYS_KEPT=False))]  # fmt: skip
    for flag in (False, True):
        out += [(rms._rms_apply_kernel, dict(HAS_IDX=flag, BLOCK=2048)),
                (rms._rms_backward_kernel, dict(HAS_IDX=flag, SCATTER=flag, HAS_RES=flag, BLOCK=2048)),
                (rope._rope_kernel, dict(SIGN=-1.0, HAS_IDX=flag, HALF=32, BLOCK_H=16, BLOCK_HALF=32)),
                (sw._swiglu_backward_kernel, dict(HAS_IDX=flag, BLOCK=sw.BLOCK_F))]  # fmt: skip
    return out + [(ce._ce_forward_kernel, dict(BLOCK=1024)), (ce._ce_grad_kernel, dict(BLOCK=ce.BLOCK_V)),
                  (rms._rms_forward_kernel, dict(BLOCK=2048)), (sw._swiglu_forward_kernel, dict(BLOCK=sw.BLOCK_F))]


def signature(kernel, constexprs: dict, dtype: str) -> dict:
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in I64 + I32 + F32:
            sig[name] = "*" + ("i64" if name in I64 else "i32" if name in I32 else "fp32")
        elif name in FLOATS:
            sig[name] = "fp32"
        elif name.isupper() and not any(name in s for pre, s in SIZES.items() if pre in kernel.__name__):
            sig[name] = "*" + dtype
        else:
            sig[name] = "i32"
    return sig


def compile_all() -> list[str]:
    """Compile every case for sm_90 in bf16 and fp32; returns the failures."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import importlib
    import pkgutil

    import centrifuge.ops

    failures = []
    kernels = {obj for info in pkgutil.iter_modules(centrifuge.ops.__path__)
               for name, obj in vars(importlib.import_module(f"centrifuge.ops.{info.name}")).items()
               if name.endswith("_kernel") and isinstance(obj, triton.runtime.JITFunction)}  # fmt: skip
    covered = {kernel for kernel, _ in cases("bf16")}
    failures += [f"{k.__name__}: not compiled by this test (add it to cases())" for k in kernels - covered]
    for dtype in ("bf16", "fp32"):
        for kernel, const in cases(dtype):
            launch = {k: const.pop(k) for k in ("num_warps", "num_stages") if k in const}
            missing = sorted({p.name for p in kernel.params if p.is_constexpr} - set(const))
            if missing:
                failures.append(f"{kernel.__name__}: no value for constexpr {missing} in this test")
                continue
            src = ASTSource(fn=kernel, signature=signature(kernel, const, dtype),
                            constexprs={(kernel.arg_names.index(k),): v for k, v in const.items()})  # fmt: skip
            try:
                triton.compile(src, target=GPUTarget("cuda", 90, 32), options=launch)
            except Exception as e:  # noqa: BLE001 - report every kernel that fails
                failures.append(f"{kernel.__name__} {dtype} {const}: {type(e).__name__}: {e}")
    return failures


def test_every_kernel_compiles_for_sm90(tmp_path):
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # compile, do not reuse
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    failures = json.loads(proc.stdout.strip().splitlines()[-1])
    assert failures == [], "\n".join(failures)


if __name__ == "__main__":
    print(json.dumps(compile_all()))
