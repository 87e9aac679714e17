"""Mirror a run's measurements into the active Weights & Biases run.

:func:`log_to_wandb` attaches a :class:`WandbSink` to an :class:`~stiffmon_agent.Agent`. The
sink sees every message the agent's publisher thread publishes, after it was numbered and
encoded: the values are those of the session file, bit for bit. On that thread it only appends
the message to a bounded list (O(1), never a W&B call). The W&B calls run on the training
thread, right after ``agent.step()``, at most once every ``interval`` seconds (one
``run.log`` per step with something pending), so they never interleave with the loop's own
``wandb.log`` calls (a row the loop builds with ``commit=False`` across ``agent.step()`` would
still be committed by the sink's next row). Cost (2-core VM, wandb 0.31 offline): a
monotonic-clock read per step; a 30-value row ~0.2 ms (the run's first ~1.2 ms), one per
measured step, and ~0.3 ms per step's row with ``per_step``.

What is logged, under ``prefix`` (``stiffmon/``), with ``stiffmon/step`` as the x-axis
(``run.define_metric("stiffmon/*", step_metric="stiffmon/step")``):

* every ``scalars`` value (λ1_H, Tr K, B_noise, coverage counts, …) as ``stiffmon/<name>`` at
  its step (NaN where the agent published NaN);
* with ``per_step`` (off by default: the loop logs its loss itself, and a row per step costs a
  ``run.log`` per step), every per-step value (loss, accuracy, lr/0, …) as ``stiffmon/<name>``;
* with ``matrices``, each matrix of at most ``max_cells`` cells (a class stiffness matrix) as a
  ``wandb.Table`` ``stiffmon/<name>`` (one row per matrix row, labelled); a bigger one is said
  once (``wandb-matrix`` event) and not logged.

Rows are logged with ``run.log(row)``, no ``step=``: W&B numbers them, and measurements, which
are published after their step was trained, never fall behind the run's step counter. A loop
that passes ``step=k`` to ``wandb.log`` itself must not log at the same ``k`` again after
``agent.step()``: the sink's row moved W&B's counter to ``k + 1`` and W&B drops that row
("Tried to log to step k that is less than the current step k+1", on the console; checked with
wandb 0.31). Log step-less, or all of a step's values before ``agent.step()``.
Nothing here raises into training: W&B missing, not initialised or failing is said
once, as a ``wandb-off`` / ``wandb-failed`` warning event and a console line.
"""

from __future__ import annotations

import collections
import contextlib
import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from stiffmon import protocol as p

MAX_FAILURES = 3
"""Consecutive failed ``run.log`` calls after which the sink stops logging (said once)."""


class WandbSink:
    """Turns published messages into W&B rows (on the training thread, see the module).

    Args:
        run: The W&B run (anything with ``log(dict)``; ``define_metric`` is used if present).
        table: ``wandb.Table`` (``Table(columns=..., data=...)``); None: matrices are skipped.
        warn: Called (from any thread) with ``(code, message)`` when something goes wrong.
        prefix: Key prefix; a value named ``n`` is logged as ``f"{prefix}/{n}"``.
        per_step: Log the per-step values (``columns`` messages) as well as the measurements.
        matrices: Log matrices of at most ``max_cells`` cells as tables.
        max_cells: Bound on a matrix logged as a table.
        interval: Seconds between flushes to W&B.
        max_pending: Bound on messages waiting for a flush; beyond it they are dropped, counted
            and said once.
    """

    def __init__(
        self,
        run: Any,
        *,
        table: Callable[..., Any] | None = None,
        warn: Callable[[str, str], None] = lambda code, text: None,
        prefix: str = "stiffmon",
        per_step: bool = False,
        matrices: bool = True,
        max_cells: int = 4096,
        interval: float = 1.0,
        max_pending: int = 100_000,
    ) -> None:
        self.run = run
        self._table = table
        self._warn = warn
        self.prefix = prefix.rstrip("/")
        self.per_step = per_step
        self.matrices = matrices
        self.max_cells = max_cells
        self.interval = interval
        self.max_pending = max_pending
        self._pending: collections.deque[p.Message] = collections.deque()
        self._next_flush = 0.0  # time.monotonic() of the next flush
        self.rows = 0  # rows logged
        self.dropped = 0  # messages not logged (pending list full, or after logging stopped)
        self.failures = 0  # consecutive failed log calls
        self.stopped: str | None = None  # why logging stopped for good
        self._said: set[str] = set()
        self._skipped_matrices: set[str] = set()
        step_key = f"{self.prefix}/step"
        define = getattr(run, "define_metric", None)
        if callable(define):
            try:
                define(step_key)
                define(f"{self.prefix}/*", step_metric=step_key)
            except Exception as exc:  # an old wandb: the rows still carry the step
                self._say("wandb-failed", f"wandb define_metric failed ({exc}); logging goes on")

    # ------------------------------------------------------------------ publisher-thread side

    def take(self, msg: p.Message) -> None:
        """Keep ``msg`` for the next flush (on the publisher thread: O(1), never raises)."""
        if self.stopped is not None or len(self._pending) >= self.max_pending:
            self.dropped += 1
            if self.stopped is None:
                self._say("wandb-behind", self._behind_text())
            return
        self._pending.append(msg)

    def _behind_text(self) -> str:
        return (
            f"W&B logging falls behind: more than {self.max_pending} messages wait, later ones "
            f"are not mirrored to W&B ({self.dropped} so far); the session file has them all"
        )

    # ------------------------------------------------------------------ training-thread side

    def due(self) -> None:
        """Flush if ``interval`` seconds passed since the last flush (after each step)."""
        if not self._pending:
            return
        now = time.monotonic()
        if now >= self._next_flush:
            self._next_flush = now + self.interval
            try:
                self.flush()
            except Exception as exc:  # pragma: no cover - last resort, never stop training
                self._stopping(f"W&B logging stopped: {exc}; training goes on")

    def close(self) -> None:
        """Log what is pending (after the agent closed: everything it published)."""
        try:
            self.flush()
        except Exception as exc:  # pragma: no cover - last resort
            self._stopping(f"W&B logging stopped: {exc}")

    def flush(self) -> None:
        """Log every pending message: one ``run.log`` per step, in message order."""
        msgs = []
        while self._pending:
            msgs.append(self._pending.popleft())
        rows: dict[int, dict[str, Any]] = {}
        for msg in msgs:
            self._add(msg, rows)
        for step in sorted(rows):
            if self.stopped is not None:
                self.dropped += 1
                continue
            self._log({f"{self.prefix}/step": step, **rows[step]})

    def _add(self, msg: p.Message, rows: dict[int, dict[str, Any]]) -> None:
        """Put the values of ``msg`` into ``rows`` (``{step: {key: value}}``)."""
        key = f"{self.prefix}/"
        if isinstance(msg, p.Scalars):
            rows.setdefault(msg.step, {}).update(
                zip([key + n for n in msg.names], msg.values.tolist(), strict=True)
            )
        elif isinstance(msg, p.Columns) and self.per_step and not msg.sparse:
            steps = msg.steps.tolist()
            for name, values in zip(msg.names, msg.values, strict=True):
                for s, v in zip(steps, values.tolist(), strict=True):
                    if name == "accuracy" and math.isnan(v):
                        continue  # a step without logits: no accuracy, not a NaN one
                    rows.setdefault(s, {})[key + name] = v
        elif isinstance(msg, p.Matrix) and self.matrices:
            table = self._matrix_table(msg)
            if table is not None:
                rows.setdefault(msg.step, {})[key + msg.name] = table

    def _matrix_table(self, msg: p.Matrix) -> Any:
        """A ``wandb.Table`` of the matrix (None: no ``Table``, or too many cells, said once)."""
        if self._table is None:
            return None
        data = np.asarray(msg.data, dtype=np.float64)
        if data.size > self.max_cells:
            if msg.name not in self._skipped_matrices:
                self._skipped_matrices.add(msg.name)
                self._say(
                    f"wandb-matrix:{msg.name}",
                    f"matrix {msg.name} ({data.shape[0]}×{data.shape[1]}) is not mirrored to "
                    f"W&B: more than max_cells={self.max_cells} cells (the monitor shows it)",
                )
            return None
        n_rows, n_cols = data.shape
        cols = (
            list(msg.col_labels)
            if len(msg.col_labels) == n_cols
            else [str(j) for j in range(n_cols)]
        )
        labels = (
            list(msg.row_labels)
            if len(msg.row_labels) == n_rows
            else [str(i) for i in range(n_rows)]
        )
        body = [[labels[i], *data[i].tolist()] for i in range(n_rows)]
        return self._table(columns=["row", *cols], data=body)

    def _log(self, row: dict[str, Any]) -> None:
        try:
            self.run.log(row)
        except Exception as exc:
            self.failures += 1
            self.dropped += 1
            if self.failures == 1:
                self._say("wandb-failed", f"wandb run.log failed ({exc}); training goes on")
            if self.failures >= MAX_FAILURES:
                self._stopping(
                    f"W&B logging stopped after {self.failures} failed run.log calls (last: "
                    f"{exc}); the session file has every value; training goes on"
                )
            return
        self.failures = 0
        self.rows += 1

    def _stopping(self, text: str) -> None:
        if self.stopped is None:
            self.stopped = text
            self._said.discard("wandb-failed")
            self._say("wandb-failed", text)

    def _say(self, code: str, text: str) -> None:
        """Warn once per ``code``."""
        if code in self._said:
            return
        self._said.add(code)
        with contextlib.suppress(Exception):  # never raise into the caller
            self._warn(code.split(":")[0], text)


def log_to_wandb(
    agent: Any,
    run: Any = None,
    *,
    module: Any = None,
    **options: Any,
) -> WandbSink | None:
    """Mirror ``agent``'s measurements into a W&B run (see the module); call it right after the
    agent is made (and after ``wandb.init``).

    Args:
        agent: The :class:`~stiffmon_agent.Agent` (on a rank that does not publish: nothing).
        run: The W&B run; None: ``wandb.run``, the active one.
        module: The ``wandb`` module (None: ``import wandb``); its ``Table`` makes the tables.
        **options: Options of :class:`WandbSink` (``prefix``, ``per_step``, ``matrices``,
            ``max_cells``, ``interval``, ``max_pending``).

    Returns:
        The sink (closed with the agent), or None when there is nothing to log to: W&B is not
        installed or no run is active (said once as a ``wandb-off`` warning event; training
        goes on).
    """
    publisher = getattr(agent, "publisher", None)
    if publisher is None:
        return None

    warn = agent.warn  # a console line naming the run and a warning event, as the agent's own
    if module is None:
        try:
            import wandb as module  # type: ignore[import-not-found,no-redef]
        except Exception as exc:
            warn("wandb-off", f"not mirrored to W&B: wandb cannot be imported ({exc})")
            return None
    if run is None:
        run = getattr(module, "run", None)
    if run is None or not callable(getattr(run, "log", None)):
        warn("wandb-off", "not mirrored to W&B: no active run (call wandb.init() first)")
        return None
    sink = WandbSink(run, table=getattr(module, "Table", None), warn=warn, **options)
    _attach(agent, publisher, sink)
    return sink


def _attach(agent: Any, publisher: Any, sink: WandbSink) -> None:
    """Feed ``sink`` every message ``publisher`` publishes, and close it with ``agent``.

    The sink joins the publisher's ``sinks`` (called by its thread for each published message
    but heartbeats); ``agent.step`` and ``agent.close`` are wrapped on the instance (the class
    is untouched) to flush on the training thread.
    """
    publisher.sinks.append(sink.take)
    step, close = agent.step, agent.close

    def step_then_flush(*args: Any, **kwargs: Any) -> Any:
        out = step(*args, **kwargs)
        sink.due()
        return out

    def close_both(*args: Any, **kwargs: Any) -> None:
        try:
            close(*args, **kwargs)
        finally:
            sink.close()

    agent.step, agent.close = step_then_flush, close_both
