"""Flush the live agents when the process gets SIGTERM (``kill``, SLURM, Kubernetes, ``timeout``).

Python's default action for SIGTERM ends the process at once: no ``atexit``, no ``bye``, and
the session file lacks up to the last batch of steps. :func:`install`, called when an agent
starts publishing, fixes that under these rules:

* It installs at most one handler per process, and only from the main thread of the main
  interpreter, and only while SIGTERM's handler is the default (``SIG_DFL``). A handler the user
  or a framework (Lightning, accelerate, torchrun's elastic agent, ``SIG_IGN``) installed is
  never replaced; that is logged once (those handlers decide what happens, and no bye is
  written unless they exit through ``atexit`` or close the agent).
* On SIGTERM the handler restores ``SIG_DFL`` first (a second SIGTERM kills at once), closes
  every live agent with reason ``"terminated"`` within :data:`CLOSE_SECONDS` in all, then sends
  SIGTERM to the process again, which therefore ends exactly as it would have (status -15, 143
  in a shell). The closes run on a helper thread the handler waits for with that bound: the
  signal may have interrupted the training thread inside the agent (holding a lock the close
  needs), and the process must still die promptly.
* It acts only in the process that installed it: a forked child (a DataLoader worker inherits
  the handler but neither the publisher threads nor a right to the parent's agents) just
  restores the default and kills itself again. A child that makes its own agent takes over.
* With no live agent (all closed normally) the handler, left installed, only restores the
  default and kills again.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable
from types import FrameType
from typing import Protocol

log = logging.getLogger("stiffmon_agent")

CLOSE_SECONDS = 3.0  # the whole flush on SIGTERM: every agent's close, then the process dies


class Closable(Protocol):
    def close(self, reason: str = ..., timeout: float = ...) -> None: ...


_owner_pid: int | None = None  # the process whose agents the handler closes
_agents: Callable[[], Iterable[Closable]] = tuple
_told_foreign = False
_told_thread = False


def install(agents: Callable[[], Iterable[Closable]]) -> bool:
    """Install the SIGTERM handler if the rules allow it (see the module); True if ours is in
    place. ``agents()`` lists the live agents when the signal comes."""
    global _owner_pid, _agents, _told_foreign, _told_thread
    if threading.current_thread() is not threading.main_thread():
        if not _told_thread and signal.getsignal(signal.SIGTERM) is not _on_sigterm:
            _told_thread = True
            log.warning(
                "stiffmon: agent made in thread %r: Python sets signal handlers from the main "
                "thread only, so a SIGTERM (kill, SLURM, timeout) ends the process without the "
                "agents' last steps and bye; call stiffmon_agent.termination.flush_on_sigterm() "
                "in the main thread before starting the trials",
                threading.current_thread().name,
            )
        return False
    try:
        current = signal.getsignal(signal.SIGTERM)
        if current is _on_sigterm:  # ours; inherited by a fork that now has its own agents
            _owner_pid, _agents = os.getpid(), agents
            return True
        if current is not signal.SIG_DFL:
            if not _told_foreign:
                _told_foreign = True
                log.info(
                    "stiffmon: SIGTERM already has a handler (the script's or a framework's), "
                    "left alone: the agent flushes and says bye at exit if that handler exits "
                    "normally, not on the signal itself"
                )
            return False
        signal.signal(signal.SIGTERM, _on_sigterm)
    except (ValueError, OSError):  # not the main interpreter, or no SIGTERM here
        return False
    _owner_pid, _agents = os.getpid(), agents
    return True


def flush_on_sigterm() -> bool:
    """From the main thread, before starting trials in threads (Optuna ``n_jobs``, a
    ``ThreadPoolExecutor``) whose agents cannot set the handler themselves: SIGTERM then closes
    every live agent of the process (flush, bye ``terminated``) before it dies, as :func:`install`
    does for an agent made in the main thread. True if the handler is in place (not where
    another handler is: see the module)."""
    from stiffmon_agent.agent_output import LIVE_AGENTS  # the agents made later, in any thread

    return install(lambda: list(LIVE_AGENTS))


def _close_all(agents: list[Closable], deadline: float) -> None:
    for agent in agents:
        with contextlib.suppress(Exception):  # the others still get their bye
            agent.close(reason="terminated", timeout=max(deadline - time.monotonic(), 0.05))


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if os.getpid() == _owner_pid:
        agents = list(_agents())
        if agents:
            deadline = time.monotonic() + CLOSE_SECONDS
            helper = threading.Thread(
                target=_close_all, args=(agents, deadline), name="stiffmon-sigterm", daemon=True
            )
            helper.start()
            helper.join(max(deadline - time.monotonic(), 0.0) + 0.25)
    os.kill(os.getpid(), signal.SIGTERM)


def exit_reason() -> str:
    """The bye's reason at interpreter exit: ``error: RuntimeError`` when an uncaught exception
    ends the script (the interpreter keeps it as ``sys.last_value`` once printed, whatever
    ``sys.excepthook`` is), ``interrupted`` for Ctrl-C, else ``exit``. An interactive session
    (REPL, IPython) keeps the last exception of any earlier command there: ``exit``."""
    exc = getattr(sys, "last_exc", None) or getattr(sys, "last_value", None)
    interactive = hasattr(sys, "ps1") or sys.flags.interactive or "IPython" in sys.modules
    if exc is None or interactive or isinstance(exc, SystemExit):
        return "exit"
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    return f"error: {type(exc).__name__}"
