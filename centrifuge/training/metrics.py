"""Training metrics: JSONL (always), TensorBoard (when installed), and a PNG
of the loss curves at the end."""

from __future__ import annotations

import json
import math
from pathlib import Path


class MetricsLog:
    """Appends one JSON object per line to ``<out_dir>/metrics.jsonl``.

    Every record has ``kind`` ("train" or "eval") and ``step``. On resume from
    step ``s``, records after ``s`` (written by the interrupted run after its
    last checkpoint) are dropped, so the file describes exactly one history."""

    def __init__(self, out_dir: Path, resume_step: int | None = None, tensorboard: bool = True):
        self.path = Path(out_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self._file = open(self.path, "a")
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(Path(out_dir) / "tensorboard"))
            except Exception:  # tensorboard not installed: JSONL only
                self._tb = None

    @property
    def tensorboard(self) -> bool:
        return self._tb is not None

    def log(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            kind, step = record.get("kind", "train"), int(record["step"])
            for k, v in record.items():
                if k not in ("kind", "step") and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(f"{kind}/{k}", v, step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: str | Path) -> list[dict]:
    out = []
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if line:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short by a crash
                continue
    return out


def plot_losses(metrics_path: str | Path, png_path: str | Path, title: str = "") -> Path | None:
    """Loss curves (train loss on kept tokens, train loss on all tokens, eval
    loss) and eval accuracy vs step. Returns the PNG path, or None without
    matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    records = read_metrics(metrics_path)
    train = [r for r in records if r.get("kind") == "train"]
    ev = [r for r in records if r.get("kind") == "eval"]
    has_acc = any(r.get("accuracy") is not None for r in ev)
    fig, axes = plt.subplots(1, 2 if has_acc else 1, figsize=(11 if has_acc else 6.5, 4))
    ax = axes[0] if has_acc else axes
    if train:
        steps = [r["step"] for r in train]
        ax.plot(steps, _smooth([r["loss"] for r in train]), label="train loss (kept tokens)")
        ax.plot(steps, _smooth([r["loss_all"] for r in train]), label="train loss (all tokens)",
                alpha=0.8)  # fmt: skip
    if ev:
        ax.plot([r["step"] for r in ev], [r["loss"] for r in ev], "o-", label="eval loss (held out)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    if has_acc:
        acc = [r for r in ev if r.get("accuracy") is not None]
        axes[1].plot([r["step"] for r in acc], [100 * r["accuracy"] for r in acc], "o-", color="C3")
        axes[1].set_xlabel("step")
        axes[1].set_ylabel("eval answer accuracy (%)")
        axes[1].grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return Path(png_path)


def _smooth(values: list[float], alpha: float = 0.1) -> list[float]:
    """Exponential moving average (bias-corrected), for readable per-step curves."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = (1 - alpha) * avg + alpha * v
        out.append(avg / (1 - (1 - alpha) ** i) if math.isfinite(avg) else v)
    return out
