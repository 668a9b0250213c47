"""A run's progress on stderr: a bar in a terminal; in a log (stderr is a file
or a pipe) a plain line every few steps, since a bar redrawn in place turns
into one line per redraw there."""

from __future__ import annotations

import sys
import time

PLAIN_LINES = 20  # lines a whole run prints in a log


def _duration(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Progress:
    """``step`` after every optimizer step, ``write`` for a message (stdout);
    nothing at all when ``enabled`` is False."""

    def __init__(self, label: str, total: int, initial: int, enabled: bool, stream=None):
        self.label, self.total, self.initial, self.enabled = label, total, initial, enabled
        self.stream = stream or sys.stderr
        self.bar = None
        if enabled and self.stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
                            desc=label, file=self.stream)  # fmt: skip
        self.every = max(1, total // PLAIN_LINES)
        self.t0 = time.perf_counter()

    def step(self, step: int, loss: float, kept: float, tokens_per_s: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.3f}", kept=f"{kept:.2f}", tok_s=f"{tokens_per_s:.0f}",
                                 refresh=False)  # fmt: skip
            self.bar.update(1)  # one redraw a step
        elif self.enabled and (step % self.every == 0 or step == self.total):
            elapsed = time.perf_counter() - self.t0
            eta = elapsed / (step - self.initial) * (self.total - step)
            print(f"[{self.label}] step {step}/{self.total}: loss {loss:.4f}, kept {kept:.2f}, "
                  f"{tokens_per_s:,.0f} tokens/s, {_duration(elapsed)} elapsed, ETA {_duration(eta)}",
                  file=self.stream, flush=True)  # fmt: skip

    def write(self, msg: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(msg)  # above the bar
        else:
            print(msg, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
