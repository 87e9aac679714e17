"""The optimizer's per-step columns, read at every step for a few µs.

:class:`OptimizerColumns` reads the columns of
:func:`~stiffmon_agent.optimizer_read.optimizer_columns`: the names and where each value lives are
worked out once and again whenever the param groups change (or every :data:`RECHECK_STEPS` steps,
for a group edited in place), then each step only reads the values. They are read as
``optimizer.step()`` starts (a step pre-hook), so a step's ``lr/i`` is the learning rate that step
used whether ``scheduler.step()`` comes before ``agent.step()`` or after it. The same hook tells a
step with no optimizer step (``GradScaler`` skipped it on inf/NaN gradients):
:attr:`OptimizerColumns.skipped_back`. A wrapper whose own ``step()`` the loop never calls (SAM's
``first_step()`` / ``second_step()``, which step its base optimizer) is read at its wrapped
optimizer's steps (:func:`~stiffmon_agent.optimizer_read.wrapped_optimizer`); where no step is seen
at all, the values are read at ``agent.step()`` and a warning says so (:data:`UNSEEN_CODE`).
"""

from __future__ import annotations

from typing import Any

import torch

from stiffmon_agent.backward_count import BackwardCount
from stiffmon_agent.optimizer_read import (
    Place,
    column_places,
    read_places,
    wrapped_optimizer,
)
from stiffmon_agent.optimizer_skips import Cycles

RECHECK_STEPS = 256
UNSEEN_CALLS = 64  # agent.step() calls without any optimizer step seen: the hook never sees one
UNSEEN_CODE = "optimizer-step-unseen"


def _smallest_with_grad(optimizer: Any) -> Any:
    """The smallest parameter of ``optimizer`` with a gradient (the hook keeps a reference to
    that gradient: small), or None."""
    try:
        params = [q for g in optimizer.param_groups for q in g["params"] if q.grad is not None]
        return min(params, key=lambda q: q.numel(), default=None)
    except Exception:
        return None


class OptimizerColumns:
    """:func:`~stiffmon_agent.optimizer_read.optimizer_columns` at every step, without working
    the names out again.

    In a real training loop every Python operation costs several times its tight-loop time (the
    caches are cold after the step): building the names anew took ~5 µs a step, reading the values
    where they are known to be takes ~2.

    Args:
        optimizer: The optimizer (None: no columns).
    """

    def __init__(self, optimizer: torch.optim.Optimizer | None) -> None:
        self.optimizer = optimizer
        self.names: tuple[str, ...] = ()
        self._groups: list[dict[str, Any]] | None = None
        self._count = -1
        self._places: list[Place] = []
        self._age = 0
        self._row: tuple[str, ...] = ()
        self._row_key: tuple[tuple[str, ...] | None, int] = (None, 0)
        self._stepped: tuple[list[Place], list[Any]] | None = None  # the last row's values
        self._hook: Any = None
        self._inner_hook: Any = None  # on the wrapped optimizer, until the wrapper's step is seen
        self._tensors = False  # a value is a tensor (a scheduler may change it in place)
        self._steps_since = 0  # optimizer steps read by the hook since the last values()
        self._calls = 0
        self._judging = False  # whether agent.step() comes before optimizer.step(): see attach
        self.read_now = False  # values() reads them as they are (agent.step() comes first)
        # (code, message, also on the console) for the agent to say once each: why read_now
        # was set, or that no optimizer step is ever seen
        self.notes: list[tuple[str, str, bool]] = []
        self._watched: Any = None  # a small parameter: was there a backward since a step?
        self._grad_mark: tuple[Any, int] | None = None  # its grad at the last optimizer step
        self._values_calls = 0
        self._fired = False  # the hook has seen an optimizer step
        self._hook_blind = False  # 64 calls and no step seen: a wrapper's steps miss the hook
        self._quiet: list[int] = []  # calls with no optimizer step in the current cycle
        self._cycles = Cycles()  # which of them are skipped steps (not accumulation)
        self.skipped_back: list[int] = []  # told at this call: skipped steps, calls back (0: now)
        self.backwards = BackwardCount()
        self.accumulation = 0  # backward passes per optimizer step, once judged ≥ 2 (to say)

    def attach(self, count_backwards: bool = False) -> None:
        """Read the values as each ``optimizer.step()`` starts (a step pre-hook; optimizers
        without ``register_step_pre_hook`` are read at :meth:`values`); with
        ``count_backwards``, also learn the backward passes per optimizer step
        (:attr:`accumulation`)."""
        register = getattr(self.optimizer, "register_step_pre_hook", None)
        # the order is judged from the first step on: not for an agent made mid-run (the first
        # call may follow the last optimizer step), which an optimizer's state says, or, for one
        # that keeps none (plain SGD), gradients on its parameters
        self._judging = (
            not getattr(self.optimizer, "state", None)
            and _smallest_with_grad(self.optimizer) is None
        )
        if self._hook is None and callable(register):
            try:
                self._hook = register(self._on_optimizer_step)
            except Exception:  # read at values() instead
                self._hook = None
        if self._hook is not None and count_backwards:
            self.backwards.attach(self.optimizer)
        self._hook_wrapped()

    def _hook_wrapped(self) -> None:
        """Also read at the steps of the optimizer a wrapper wraps (SAM's ``second_step()``
        steps its base optimizer; the wrapper's own ``step()`` may never run). Its hook goes as
        soon as the wrapper's own step is seen (it calls the wrapped one's: counted twice);
        without a hook of its own the wrapper is read at the wrapped one's steps alone. Its
        backward passes are not counted: two per step are SAM's, not accumulation."""
        inner = wrapped_optimizer(self.optimizer) if self._inner_hook is None else None
        if inner is None:
            return
        try:
            handle = inner.register_step_pre_hook(self._on_optimizer_step)
        except Exception:  # not hookable: read at values()
            return
        if self._hook is None:
            self._hook = handle
        else:
            self._inner_hook = handle

    def _on_optimizer_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        """A step of the optimizer, or of the one it wraps (see :meth:`_hook_wrapped`)."""
        if self._inner_hook is not None and optimizer is self.optimizer:
            self._inner_hook.remove()  # the wrapper's own step is seen: it steps the inner one
            self._inner_hook = None
        backwards = self.backwards
        if backwards.usual is None and optimizer is self.optimizer:
            backwards.on_optimizer_step()
            if backwards.usual is not None and backwards.usual > 1:
                self.accumulation = backwards.usual
        try:
            got = self._read()  # first: it may work the places out again
        except Exception:  # never into the user's optimizer step; values() reads them then
            return
        self._stepped = (self._places, got)
        self._steps_since += 1
        try:
            grad = getattr(self._watched, "grad", None)
            if grad is None:  # the first step, or a parameter that got no gradient this time
                self._watched = _smallest_with_grad(optimizer)
                grad = getattr(self._watched, "grad", None)
            self._grad_mark = (grad, grad._version) if grad is not None else None
        except Exception:
            self._grad_mark = None

    def _backward_since_step(self) -> bool:
        """Whether a backward pass has written the watched gradient since the last optimizer
        step (its tensor replaced or changed in place; None: zeroed to None, no backward)."""
        grad = getattr(self._watched, "grad", None)
        if grad is None or self._grad_mark is None:
            return grad is not None
        return grad is not self._grad_mark[0] or grad._version != self._grad_mark[1]

    def remove_hook(self) -> None:
        """Stop reading at ``optimizer.step()`` (the agent is closed)."""
        for hook in (self._hook, self._inner_hook):
            if hook is not None:
                hook.remove()
        self._hook = self._inner_hook = None
        self.backwards.remove()

    def handed_on(
        self, optimizer: torch.optim.Optimizer | None, attach: bool = True
    ) -> OptimizerColumns:
        """The columns of ``optimizer``, which replaces this one mid-run (``Agent.set_optimizer``),
        hooked where ``attach``: this one's hooks are removed; what was learnt of the loop carries
        over (the order of ``agent.step()`` and ``optimizer.step()``, judged once per run, and
        the backward passes per step, counted on until judged)."""
        counting = self.backwards.counting
        self.remove_hook()
        new = OptimizerColumns(optimizer)
        new.read_now = self.read_now
        if attach:
            new.attach(count_backwards=counting)
            new._judging = False
        return new

    def stepped_groups(self) -> list[dict[str, Any]] | None:
        """Copies of the param groups with the values of the last :meth:`values` (those the
        last ``optimizer.step()`` used, or as they were at a step without one), for the
        stability thresholds of a measurement at that step; None before any."""
        if self._stepped is None or self.optimizer is None:
            return None
        places, got = self._stepped
        copies = {id(g): dict(g) for g in self.optimizer.param_groups}
        for (_, g, key, i), v in zip(places, got, strict=True):
            c = copies.get(id(g))
            if c is None:  # a group removed since
                continue
            if i < 0:
                c[key] = v
            else:
                seq = list(c[key])
                seq[i] = v
                c[key] = tuple(seq)
        return list(copies.values())

    def row_names(self, extra: int) -> tuple[str, ...]:
        """A step's column names: ``loss``, :attr:`names`, then ``accuracy`` (``extra & 1``)
        and ``batch_size`` (``extra & 2``); made again only when one of them changes."""
        if self.names is not self._row_key[0] or extra != self._row_key[1]:
            more = ("accuracy",) * (extra & 1) + ("batch_size",) * (extra >> 1)
            self._row = ("loss", *self.names, *more)
            self._row_key = (self.names, extra)
        return self._row

    def values(self) -> list[Any]:
        """The values the optimizer step since the last call used, else the current values, in
        the order of :attr:`names` (which may change at this call)."""
        n, self._steps_since = self._steps_since, 0
        self._values_calls += 1
        self._note_quiet(n)
        if self._judging:
            self._judge_order(n)
        if self.skipped_back:  # told at the last call (a new list only then: the hot path)
            self.skipped_back = []
        if self._quiet or (n and self._cycles.held):
            # calls with no optimizer step since the last: skipped steps (or, with agent.step()
            # first, the ones before), past those gradient accumulation makes
            told = self._cycles.tell(self._quiet, n > 0, self._fired and not self._judging)
            shift = 1 if self.read_now else 0
            if told:
                self.skipped_back = [self._values_calls - q + shift for q in told]
        elif n:
            self._cycles.lengths.append(1)  # the common case, without a call
        if n and self._stepped is not None and not self.read_now:
            return self._stepped[1]
        got = self._read()
        self._stepped = (self._places, got)  # what this step's row says: its thresholds too
        return got

    def _note_quiet(self, n: int) -> None:
        """Remember a call (not the first: ambiguous) with no optimizer step since the last one,
        told once the hook has seen a step (a wrapper whose steps never reach the hook: never;
        :data:`UNSEEN_CALLS` such calls before any step: the hook is taken for one that never
        sees them, and a note says so where the loop trains: backward passes were counted or
        the parameters have gradients; a loop without any trains nothing to read)."""
        if n:
            self._fired, self._hook_blind = True, False
        elif self._hook is not None and self._values_calls > 1 and not self._hook_blind:
            self._quiet.append(self._values_calls)
            if not self._fired and len(self._quiet) >= UNSEEN_CALLS:
                self._quiet.clear()
                self._hook_blind = True
                if self.backwards.since_step or _smallest_with_grad(self.optimizer) is not None:
                    self.notes.append((UNSEEN_CODE, self._unseen_message(), True))

    def _unseen_message(self) -> str:
        """What :data:`UNSEEN_CODE` says: where the values are read, and what to pass instead."""
        kind = type(self.optimizer).__name__
        return (
            f"no {kind}.step() seen in {self._values_calls} calls of agent.step() (a wrapper "
            "whose own step() is never called?): lr, momentum and weight decay are read at "
            "agent.step(), so after a scheduler.step() placed before it they are the next "
            "step's, and no skipped optimizer steps are counted; pass Agent(optimizer=...) the "
            "optimizer whose step() runs (e.g. the wrapper's base optimizer)"
        )

    def _judge_order(self, n: int) -> None:
        """Over the first calls (``n`` optimizer steps since the last): ``agent.step()`` before
        ``optimizer.step()`` (the first call before any optimizer step, then exactly one between
        each of the next three calls) makes every row read the values as they are (those the
        coming step uses)."""
        self._calls += 1
        if self._calls == 1:  # after an optimizer step, or no hook: the usual order
            self._judging = self._hook is not None and n == 0
            if self._judging:  # skipped, or agent.step() first: held until that is judged
                self._quiet.append(1)
        elif n != 1:  # accumulation, or the usual order: the hook's values are right
            self._judging = False
            if n > 1:  # fewer agent.step() calls than optimizer steps: the first call is not
                self._cycles.forget_first(self._quiet)  # a skip
        elif self._calls == 4 and not self._backward_since_step():
            # the same counts as agent.step() first, but no backward since the optimizer step:
            # the usual order, and the first step was skipped (GradScaler's first steps often are)
            self._judging = False
        elif self._calls == 4:
            self._cycles.forget_first(self._quiet)
            self._judging, self.read_now = False, True
            self.notes.append(
                (
                    "step-order",
                    "agent.step() is called before optimizer.step(): each row's lr, momentum and "
                    "weight decay are read at agent.step(), as the coming optimizer step will "
                    "use them (call agent.step() after optimizer.step() to measure the weights "
                    "it made)",
                    False,
                )
            )

    def _read(self) -> list[Any]:
        opt = self.optimizer
        if opt is None:
            return []
        groups = opt.param_groups
        self._age += 1
        if groups is not self._groups or len(groups) != self._count or self._age >= RECHECK_STEPS:
            self._rebuild(groups)
        try:
            got = read_places(self._places)
        except Exception:  # a key removed, a group replaced: work it out again
            self._rebuild(groups)
            try:
                got = read_places(self._places)
            except Exception:  # not an optimizer we can read: no columns rather than a crash
                self.names, self._places = (), []
                return []
        if self._tensors:  # a tensor lr (fused, capturable): a scheduler changes it in place
            got = [v.detach().clone() if isinstance(v, torch.Tensor) else v for v in got]
        return got

    def _rebuild(self, groups: list[dict[str, Any]]) -> None:
        try:
            places = column_places(self.optimizer)
        except Exception:
            places, groups = [], []
        self.names, self._places = tuple(name for name, *_ in places), places
        self._groups, self._count, self._age = groups, len(groups), 0
        try:
            self._tensors = any(isinstance(v, torch.Tensor) for v in read_places(places))
        except Exception:
            self._tensors = False
