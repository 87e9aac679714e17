"""Hold a Ctrl-C back while the model is being changed for a measurement or put back.

Python raises ``KeyboardInterrupt`` from SIGINT (Ctrl-C, a notebook's interrupt button,
``_thread.interrupt_main``) between any two bytecodes of the main thread. Inside the
measurement itself that is harmless: :func:`~stiffmon_agent.metrics.state.measurement_mode`
restores the model on the way out. But an interrupt landing *in that restoration* (or in the
set-up before it) stops it half-way: modules left in eval mode, an ``Embedding(max_norm=…)``'s
renormalised rows kept, parameters left frozen, random states not restored — and training on
gives different losses, silently.

:class:`DeferredInterrupt` closes that window: between :meth:`~DeferredInterrupt.hold` and
:meth:`~DeferredInterrupt.release` a SIGINT is only noted; ``release`` puts the previous handler
back and then delivers a noted SIGINT to it (the default handler raises ``KeyboardInterrupt``
there, after everything was put back). It holds nothing outside the main thread of the main
interpreter (signals reach that thread only), and the handler swap costs microseconds.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType
from typing import Any

__all__ = ["DeferredInterrupt", "held_interrupts"]


class DeferredInterrupt:
    """Notes SIGINT between :meth:`hold` and :meth:`release` and delivers it at ``release``.

    Holds nest (a count); the outermost ``release`` delivers.
    """

    def __init__(self) -> None:
        self._depth = 0
        self._previous: Any = None
        self._pending = False

    def _note(self, signum: int, frame: FrameType | None) -> None:
        self._pending = True

    def hold(self) -> None:
        """Start noting SIGINT instead of acting on it (main thread only; else nothing)."""
        if threading.current_thread() is not threading.main_thread():
            return
        if self._depth == 0:
            try:
                previous = signal.getsignal(signal.SIGINT)
                if previous is None:  # a handler set from C: not ours to swap
                    return
                signal.signal(signal.SIGINT, self._note)
            except (ValueError, OSError):  # not the main interpreter
                return
            self._previous, self._pending = previous, False
        self._depth += 1

    def release(self) -> None:
        """Put the previous SIGINT handler back; if a SIGINT came meanwhile, deliver it now
        (the default handler raises ``KeyboardInterrupt`` here)."""
        if self._depth == 0 or threading.current_thread() is not threading.main_thread():
            return
        self._depth -= 1
        if self._depth:
            return
        previous, self._previous = self._previous, None
        signal.signal(signal.SIGINT, previous)
        if self._pending:
            self._pending = False
            if callable(previous):
                previous(signal.SIGINT, None)
            elif previous == signal.SIG_DFL:  # the process ends, as it would have
                signal.raise_signal(signal.SIGINT)


_DEFERRED = DeferredInterrupt()


@contextlib.contextmanager
def held_interrupts() -> Iterator[None]:
    """A block that a Ctrl-C does not cut short: one that came is raised at its end."""
    _DEFERRED.hold()
    try:
        yield
    finally:
        _DEFERRED.release()


def hold() -> None:
    """:meth:`DeferredInterrupt.hold` of the process's one instance."""
    _DEFERRED.hold()


def release() -> None:
    """:meth:`DeferredInterrupt.release` of the process's one instance."""
    _DEFERRED.release()
