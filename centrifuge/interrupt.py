"""Ctrl-C and SIGTERM (what schedulers and preemptible clouds send before a
kill) end every command the same way: as :class:`Interrupted`, a
KeyboardInterrupt, so that whatever saves on Ctrl-C saves on SIGTERM too."""

from __future__ import annotations

import signal
import sys
import threading
from contextlib import contextmanager

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """A SIGINT or SIGTERM (``signum``) turned into an exception.
    ``stopped_cleanly``: a training loop stopped at a step boundary with its
    state saved (set by the loop)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.stopped_cleanly = False


def _raise(signum, frame):
    raise Interrupted(signum)


def _install(handler) -> dict:
    """Set ``handler`` for SIGINT and SIGTERM; return the previous handlers.
    Only the main thread may set handlers: elsewhere nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {s: signal.signal(s, handler) for s in SIGNALS}


def _restore(previous: dict) -> None:
    for s, h in previous.items():
        if h is not None:  # None: a handler set from C, which Python cannot reinstate
            signal.signal(s, h)


@contextmanager
def interrupts_raise():
    """Inside: SIGINT and SIGTERM raise :class:`Interrupted` at once."""
    previous = _install(_raise)
    try:
        yield
    finally:
        _restore(previous)


class DeferredStop:
    """For a training loop: the first SIGINT/SIGTERM only asks to stop, and
    :meth:`check` (called between steps, where a checkpoint continues the run
    exactly) raises :class:`Interrupted`; a second signal raises at once and
    sets ``forced`` (the state in the middle of a step is not saved)."""

    def __init__(self):
        self.signum: int | None = None
        self.forced = False
        self._previous = _install(self._handle)

    def _handle(self, signum, frame):
        if self.signum is not None:
            self.forced = True
            raise Interrupted(signum)
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: stopping after this step with a checkpoint "
              "(send it again to stop at once)", file=sys.stderr, flush=True)  # fmt: skip

    def check(self) -> None:
        if self.signum is not None:
            raise Interrupted(self.signum)

    def close(self) -> None:
        _restore(self._previous)
        self._previous = {}
