"""Benchmark results as a Markdown table, JSON and a PNG."""

from __future__ import annotations

import json
from pathlib import Path


def _fmt(x, spec=".1f"):
    return "—" if x is None else format(x, spec)


def to_markdown(result: dict) -> str:
    env, m, cfg = result["environment"], result["model"], result["config"]
    lines = [
        f"**{m['preset']}** ({m['layers']} layers, {m['parameters'] / 1e9:.2f} B parameters), "
        f"seq {cfg['seq_len']} × batch {cfg['batch']} = {m['tokens_per_step']} tokens, "
        f"{cfg['dtype']}, {env['device']}, torch {env['torch']}"
        + (f", LoRA rank {cfg['lora']} (base frozen)" if cfg.get("lora") else "")
        + (f", transformers {env['transformers']}" if "transformers" in env else ""),
        "",
        "| variant | ρ | forward ms | backward ms | step ms | peak GiB |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['label']} | {_fmt(r['ratio'], '.2f')} | {_fmt(r['forward_ms'])} | "
            f"{_fmt(r['backward_ms'])} | {_fmt(r['step_ms'])} | {_fmt(r['peak_gib'], '.2f')} |"
        )
    peer = "c/liger" if any("c/liger" in s for s in result["ratios"]) else "c/d"
    lines += ["", "Centrifuge's time over the others' (below 1 = Centrifuge faster):", "",
              f"| ρ | step c/a (dense) | backward c/a | step c/b (masked) | step {peer} |",
              "|---|---|---|---|---|"]  # fmt: skip
    for s in result["ratios"]:
        get = lambda k, f: _fmt(s.get(k, {}).get(f), ".3f")  # noqa: E731
        lines.append(f"| {s['ratio']:.2f} | {get('c/a', 'step')} | {get('c/a', 'backward')} | "
                     f"{get('c/b', 'step')} | {get(peer, 'step')} |")  # fmt: skip
    hf = [(s["ratio"], k, s[k]) for s in result["ratios"] for k in ("hfp/c", "hflp/c") if k in s]
    if hf:
        lines += ["", "The patched HF model (labels= form) over native Centrifuge "
                  "(hfp: HF + patch, hflp: HF + Liger + patch):", "",
                  "| ρ | model | step | backward | peak |", "|---|---|---|---|---|"]  # fmt: skip
        lines += [f"| {ratio:.2f} | {k.split('/')[0]} | {_fmt(v['step'], '.3f')} | "
                  f"{_fmt(v['backward'], '.3f')} | {_fmt(v.get('peak'), '.3f')} |" for ratio, k, v in hf]
    graphs = [s for s in result["ratios"] if "cg/ag" in s]
    if graphs:
        lines += ["", "CUDA graphs (every step captured; below 1 = faster):", "",
                  "| ρ | step cg/ag (dense) | backward cg/ag | step cg/bg (masked) | "
                  "step cg/c (eager Centrifuge) | step ag/a (eager dense) |", "|---|---|---|---|---|---|"]  # fmt: skip
        for s in graphs:
            get = lambda k, f: _fmt(s.get(k, {}).get(f), ".3f")  # noqa: E731
            lines.append(f"| {s['ratio']:.2f} | {get('cg/ag', 'step')} | {get('cg/ag', 'backward')} | "
                         f"{get('cg/bg', 'step')} | {get('cg/c', 'step')} | {get('ag/a', 'step')} |")  # fmt: skip
    if "step_profile" in result:
        lines += ["", f"One step at ρ = {result['breakdown_ratio']} on the device: kernels launched, "
                  "host syncs, device idle time (span minus busy, profiled); host time to issue "
                  "an unprofiled step against its wall time (equal: the host sets the pace):", "",
                  "| variant | kernels | syncs | span ms | busy ms | idle ms | host ms | wall ms |",
                  "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for name, sp in result["step_profile"].items():
            lines.append(f"| {name} | {sp['kernels']} | {sp['syncs']} | {_fmt(sp['span_ms'])} | "
                         f"{_fmt(sp['busy_ms'])} | {_fmt(sp['idle_ms'])} | {_fmt(sp.get('host_ms'))} | "
                         f"{_fmt(sp.get('wall_ms'))} |")
    if any("cc/ac" in s for s in result["ratios"]):
        lines += ["", "With activation checkpointing: Centrifuge + checkpointing over dense + "
                  "checkpointing (cc/ac) and over Centrifuge without it (cc/c):", "",
                  "| ρ | step cc/ac | backward cc/ac | step cc/bc (masked) | step cc/c | peak cc/c |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        for s in result["ratios"]:
            get = lambda k, f: _fmt(s.get(k, {}).get(f), ".3f")  # noqa: E731
            lines.append(f"| {s['ratio']:.2f} | {get('cc/ac', 'step')} | {get('cc/ac', 'backward')} | "
                         f"{get('cc/bc', 'step')} | {get('cc/c', 'step')} | {get('cc/c', 'peak')} |")  # fmt: skip
    knobs = [(s["ratio"], k, v) for s in result["ratios"] for k, v in s.get("knobs", {}).items()]
    if knobs:
        lines += ["", "Quality knobs: time over dense (the Pareto table's speed axis):", "",
                  "| variant | ρ | step / dense | backward / dense |", "|---|---|---|---|"]  # fmt: skip
        lines += [f"| {k} | {ratio:.2f} | {v['step']:.3f} | {v['backward']:.3f} |"
                  for ratio, k, v in knobs]  # fmt: skip
    if "breakdown" in result:
        cats = sorted({c for b in result["breakdown"].values() for c in b})
        lines += ["", f"Backward by component at ρ = {result['breakdown_ratio']} (ms):", "",
                  "| variant | " + " | ".join(cats) + " | total |",
                  "|---|" + "---|" * (len(cats) + 1)]  # fmt: skip
        for name, b in result["breakdown"].items():
            cells = " | ".join(_fmt(b.get(c)) for c in cats)
            lines.append(f"| {name} | {cells} | {_fmt(sum(b.values()))} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    has_breakdown = "breakdown" in result
    fig, axes = plt.subplots(1, 2 if has_breakdown else 1, figsize=(11 if has_breakdown else 6, 4))
    ax = axes[0] if has_breakdown else axes
    rows = result["rows"]
    for name in dict.fromkeys(r["variant"] for r in rows):
        pts = [r for r in rows if r["variant"] == name]
        if pts[0]["ratio"] is None:
            ax.axhline(pts[0]["step_ms"], ls="--", color="gray", label=pts[0]["label"])
        else:
            ax.plot([p["ratio"] for p in pts], [p["step_ms"] for p in pts], "o-", label=pts[0]["label"])
    ax.set_xlabel("kept ratio ρ")
    ax.set_ylabel("step time (ms)")
    ax.set_title(f"{result['model']['preset']}, {result['model']['tokens_per_step']} tokens/step")
    ax.legend(fontsize=8)
    ax.set_ylim(bottom=0)
    if has_breakdown:
        ax = axes[1]
        names = list(result["breakdown"])
        cats = sorted({c for b in result["breakdown"].values() for c in b})
        bottom = [0.0] * len(names)
        for c in cats:
            vals = [result["breakdown"][n].get(c, 0.0) for n in names]
            ax.bar(names, vals, bottom=bottom, label=c)
            bottom = [b + v for b, v in zip(bottom, vals)]
        ax.set_ylabel("backward device time (ms)")
        ax.set_title(f"backward by component, ρ = {result['breakdown_ratio']}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(result: dict, out_dir: Path, stem: str) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / f"{stem}.json", "md": out_dir / f"{stem}.md",
             "png": out_dir / f"{stem}.png"}  # fmt: skip
    paths["json"].write_text(json.dumps(result, indent=2))
    paths["md"].write_text(to_markdown(result))
    plot(result, paths["png"])
    return paths
