"""Ctrl-C and SIGTERM during a search: stop cleanly, keep what ran, say how to resume.

Ray Tune stops its loop and saves the experiment state on SIGUSR1 (and on SIGINT, with its own
``Tuner.restore(...)`` hint). sertune takes SIGINT and SIGTERM itself, remembers that the search
was interrupted, and hands Tune a SIGUSR1; the search then ends as ``interrupted`` (exit 130),
its open MLflow runs are closed as KILLED, and ``sertune search resume NAME`` continues it. A
second Ctrl-C stops at once.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Callable, Iterator
from types import FrameType


class Stopped(Exception):
    """A stop signal ended a phase's Tune loop: the phase is not complete (``StopSignals.check``)."""


class StopSignals:
    """Within ``with StopSignals() as stop:``, ``stop.fired`` names the signal that arrived."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, log: Callable[[str], None] = print):
        self.fired: str | None = None
        self.forced = False  # a second signal: stop at once (the record is still written)
        self.log = log
        self._previous: dict[int, object] = {}
        self._in_tune = False

    @contextlib.contextmanager
    def tune_loop(self) -> Iterator[None]:
        """Around ``Tuner.fit()``: a signal then ends Tune's loop cleanly instead of raising."""
        self._in_tune = True
        try:
            yield
        finally:
            self._in_tune = False

    def check(self) -> None:
        """Raise :class:`Stopped` when a signal has arrived (after Tune's loop has ended)."""
        if self.fired:
            raise Stopped(self.fired)

    def __enter__(self) -> StopSignals:
        os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"  # ours forwards to Tune's SIGUSR1 stop
        try:
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread (a notebook's worker thread): Tune's defaults
            self._previous.clear()
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.fired:
            self.forced = True
            print("\n[sertune] stopping now", file=sys.stderr, flush=True)
            raise KeyboardInterrupt
        self.fired = signal.Signals(signum).name
        self.log(
            f"\n[sertune] {self.fired}: stopping the search and saving its state "
            "(press Ctrl-C again to stop at once)"
        )
        if self._in_tune and callable(signal.getsignal(signal.SIGUSR1)):
            os.kill(os.getpid(), signal.SIGUSR1)  # Tune's own handler ends its loop cleanly
        else:  # outside Tune's loop (data preparation, between phases): stop right here
            raise KeyboardInterrupt


@contextlib.contextmanager
def ignoring_signals() -> Iterator[None]:
    """SIGINT and SIGTERM ignored for a bounded step that must finish (the record of an
    interrupted search); the handlers before are restored after."""
    try:
        previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in StopSignals.SIGNALS}
    except ValueError:  # not the main thread
        previous = {}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
