"""Running one due heavy measurement: the budget's say, the metric call, its failure path.

:class:`MeasurementRunner` is the agent's *what happens when a measurement is due*: skip it if
its metric is disabled or the overhead budget says no, skip it (with an ``event``) while the run
is not finite, turn an exception into ``metric-error`` / ``metric-disabled`` events, and hand
the messages to the publisher. A curvature measurement's product budget is first fitted to the
free memory, and its out-of-memory error lowers that budget instead of disabling it
(:mod:`~stiffmon_agent.memory_guard`).

Sharded (``Agent(distributed=True)`` under torch.distributed with W > 1 ranks,
:mod:`~stiffmon_agent.distributed`): every rank calls :meth:`MeasurementRunner.measure` at the
same due steps; rank 0 decides (disabled? within the budget?) and broadcasts the decision, the
finiteness check is agreed over the ranks, then every rank computes its share — its rows of the
Gram matrix, its shard's Hessian-vector products — and rank 0 assembles and publishes.
"""

from __future__ import annotations

import logging
import math
import re
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from stiffmon import protocol as p
from stiffmon_agent.budget import MeasurementBudget
from stiffmon_agent.distributed import Shard, sharded_check_finite
from stiffmon_agent.measure import (
    MeasurementSkipped,
    ProbeSet,
    SharpnessState,
    check_finite,
)
from stiffmon_agent.measure_options import MeasureOptions
from stiffmon_agent.memory_guard import (
    MemoryGuard,
    MemorySkipped,
    human_bytes,
    is_out_of_memory,
    release,
)
from stiffmon_agent.metrics.probe import ForwardFn, LossFn, loss_reduction, take
from stiffmon_agent.metrics.state import optimized_only
from stiffmon_agent.outgoing import Outgoing
from stiffmon_agent.rank_gate import RankGate, RanksMissing
from stiffmon_agent.sharded import HvpLeader, serve_hvps, sharded_activations, sharded_gram
from stiffmon_agent.zero_gradients import ZERO_CODE, ZeroGradientSayer

log = logging.getLogger("stiffmon_agent")


class MeasurementRunner:
    """Runs the due heavy measurements of one agent (see the module docstring).

    Args:
        model: The (unwrapped) network.
        loss_fn: The training loss.
        optimizer: The optimizer (thresholds, preconditioner).
        probe: The probe set (the same global probe on every rank when sharded).
        forward: ``forward(model, inputs)`` or None.
        opts: The measurements' settings.
        budget: The overhead budget (rank 0's decides for every rank).
        sharp_state: What the sharpness measurement carries over.
        submit: Hands a message to the publisher.
        event: Publishes an ``event``.
        flush: Sends the steps so far before a measurement's messages.
        gate: When sharded, where the ranks meet before each measurement (with a time limit),
            holding this rank's place; None: one process measures alone.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        optimizer: torch.optim.Optimizer | None,
        probe: ProbeSet,
        forward: ForwardFn | None,
        opts: MeasureOptions,
        budget: MeasurementBudget,
        sharp_state: SharpnessState,
        submit: Callable[[Outgoing], Any],
        event: Callable[..., None],
        flush: Callable[[], Any],
        gate: RankGate | None = None,
    ) -> None:
        self.model = model
        self.loss_fn = loss_fn
        self.optimizer = optimizer
        self.probe = probe
        self.forward = forward
        self.opts = opts
        self.budget = budget
        self.sharp_state = sharp_state
        self.submit = submit
        self.event = event
        self.flush = flush
        self.gate = gate
        self.disabled: dict[str, str] = {}
        self._said: set[tuple[str, str]] = set()  # events published (each once)
        self._zeros = ZeroGradientSayer()
        # a Gram measurement finds non-finite gradients itself: after one has worked (the probe
        # forward's own error message is said at the first), it skips check_finite's forward
        self._gram_worked = False
        self._blocked = -1  # the step at which a due kind did not fit the budget
        self.warm: Tensor | None = None
        # the param groups as the last optimizer step used them (None: the optimizer's own)
        self.stepped_groups: Callable[[], list[dict[str, Any]] | None] = lambda: None
        self.generator = torch.Generator().manual_seed(0)
        self.memory = MemoryGuard()  # the product budgets the free memory allows

    @property
    def shard(self) -> Shard | None:
        """This rank's place while the measurements are sharded; None: one process measures."""
        return self.gate.shard if self.gate is not None else None

    def measure(self, kind: str, step: int) -> bool:
        """Run the due ``kind`` measurement of ``step`` (every rank calls this when sharded);
        True if it went ahead (the same answer on every rank)."""
        leader = self.shard is None or self.shard.leader
        go = self._decide(kind, step) if leader else False
        if self.gate is not None:
            try:
                go = self.gate.decide(go, step)
            except RanksMissing as exc:
                self._unshard(exc)
                if not leader:
                    return False
        if not go:
            return False
        with optimized_only(self.model, self.optimizer, self.stepped_groups()):
            if leader:
                self._run(kind, step)
            else:
                self._follow(kind)
        return True

    def _unshard(self, exc: RanksMissing) -> None:
        """Stop sharding for good: rank 0 measures alone from now on, the others not at all."""
        assert self.gate is not None
        rank, self.gate = self.gate.shard.rank, None
        then = "rank 0 measures alone from now on" if rank == 0 else "this rank stops measuring"
        message = f"sharded measurement is off: {exc}; {then}"
        log.warning(f"stiffmon: rank {rank}: {message}")
        self.event("sharding-off", message, level="warning")

    def _run(self, kind: str, step: int) -> None:
        self.flush()  # the steps so far go out before the measurement (seq order)
        t0 = time.perf_counter()
        msgs: list[Outgoing] = []
        try:
            losses = kind != "gram" or not self._gram_worked
            if self.shard is not None:
                sharded_check_finite(
                    self.model, self.loss_fn, self.probe, self.shard, self.forward, losses=losses
                )
            else:
                check_finite(self.model, self.loss_fn, self.probe, self.forward, losses=losses)
            msgs = self._messages(kind, step)
            self._gram_worked |= kind == "gram"
        except MemorySkipped as exc:
            self.budget.skip(kind, "memory", str(exc), needed_bytes=exc.needed, free_bytes=exc.free)
            return
        except MeasurementSkipped as exc:  # said at the 1st, 2nd, 5th, 10th, ... such skip
            self.budget.skip(kind, "not-finite", str(exc))
            return
        except Exception as exc:
            if kind != "gram" and is_out_of_memory(exc):
                self._out_of_memory(kind, exc)
                return
            self._disable(kind, exc)
            self.budget.failed(kind)  # the metric-error event says why
            return
        finally:
            self.budget.record_cost(kind, time.perf_counter() - t0, _hvps_used(msgs))
        self.budget.done(kind)
        for m in msgs:
            if m.cls is p.Event and m.fields["code"] == ZERO_CODE:  # again if the share moved
                if self._zeros.due(m.fields["attrs"]["share"]):
                    log.info(f"stiffmon: {m.fields['message']}")
                    self.submit(m)
                continue
            if m.cls is p.Event:  # a reason is said once, not at every measurement
                said = (m.fields["code"], re.sub(r"\d[\d.e+-]*", "#", m.fields["message"]))
                if said in self._said:
                    continue
                self._said.add(said)
            self.submit(m)

    def _decide(self, kind: str, step: int) -> bool:
        if kind in self.disabled:
            self.budget.skip(kind, "disabled")
            return False
        # a kind that did not fit blocks the rest of its step: cheaper kinds must not overtake
        # it, or a Gram would spend the headroom at every due step and the sharpness never run
        planned = self.opts.density_hvps() if kind == "density" else 0
        if self._blocked == step or not self.budget.within(kind, step, planned):
            self._blocked = step
            self.budget.skipped += 1
            self.budget.skip(kind, "overhead-cap")
            return False
        return True

    def objective_scale(self) -> float:
        """B (or ``sum_over``) for a sum-reduced loss where known, else 1 (as the sharpness
        uses)."""
        b = self.sharp_state.sum_scale
        return float(b) if loss_reduction(self.loss_fn) == "sum" and b else 1.0

    def _messages(self, kind: str, step: int) -> list[Outgoing]:
        # looked up on the agent module, where tests patch them
        from stiffmon_agent import agent as agent_module

        common = {"forward": self.forward}
        shard = self.shard
        if kind == "gram":
            extra: dict[str, Any] = {}
            if shard is not None:
                gram = sharded_gram(
                    self.model,
                    self.loss_fn,
                    self.probe,
                    shard,
                    forward=self.forward,
                    chunk_size=self.opts.chunk_size,
                )
                assert gram is not None  # rank 0 assembles it
                extra["gram"] = gram
                if self.opts.distance_layers:
                    extra["activations"] = sharded_activations(
                        self.model, self.probe, self.opts.distance_layers, shard, self.forward
                    )
            return agent_module.gram_messages(
                self.model, self.loss_fn, self.probe, step, **common, **self.opts.gram(), **extra
            )
        leader = HvpLeader(self.model, shard, self.probe.n_train) if shard is not None else None
        if leader is not None and shard is not None:
            a, b = shard.bounds(self.probe.n_train)
            sl = slice(a, b)
            common["train"] = (take(self.probe.inputs, sl), take(self.probe.targets, sl))
            common["wrap"] = leader.wrap
        try:
            fits = self._memory_plan(kind)  # raises MemorySkipped (after leader.finish())
            if kind == "density":
                return agent_module.density_messages(
                    self.model,
                    self.loss_fn,
                    self.probe,
                    step,
                    generator=self.generator,
                    **(self.opts.density() | fits),
                    scale=self.objective_scale(),
                    **common,
                )
            msgs, self.warm = agent_module.sharpness_messages(
                self.model,
                self.loss_fn,
                self.probe,
                step,
                self.optimizer,
                warm_start=self.warm,
                generator=self.generator,
                **(self.opts.sharpness() | fits),
                state=self.sharp_state,
                groups=self.stepped_groups(),
                **common,
            )
            return msgs
        finally:
            if leader is not None:
                leader.finish()  # always: the other ranks wait for it

    def _configured(self, kind: str) -> tuple[str, int]:
        """The keyword and the configured value of a curvature measurement's product budget."""
        if kind == "density":
            return "steps", self.opts.density_steps
        return "max_hvps", self.opts.max_hvps

    def _memory_plan(self, kind: str) -> dict[str, int]:
        """The product budget the free memory allows (:mod:`~stiffmon_agent.memory_guard`),
        as keyword arguments of the measurement; a cap is said once per kind."""
        key, configured = self._configured(kind)
        # a sharpness restricted to the touched embedding rows: vectors of its warm start's size
        dim = self.warm.shape[0] if self.warm is not None else None  # (density: the same rows)
        plan = self.memory.plan(kind, self.model, configured, self.opts.hessian_k, dim)
        if plan.capped and plan.free is not None and kind not in self.memory.said:
            self.memory.said.add(kind)
            what = "steps per SLQ run" if kind == "density" else "Hessian-vector products"
            message = (
                f"{kind} capped at {plan.products} {what} (configured {configured}) to fit in "
                f"the free memory: ~{human_bytes(plan.needed)} of {human_bytes(plan.free)} free"
            )
            log.warning(f"stiffmon: {message}")
            self.event(
                "memory-capped",
                message,
                level="warning",
                metric=kind,
                products=plan.products,
                configured=configured,
                needed_bytes=plan.needed,
                free_bytes=plan.free,
            )
        return {key: plan.products}

    def _out_of_memory(self, kind: str, exc: BaseException) -> None:
        """A curvature measurement ran out of memory: free what it held, halve its product
        budget for the next time, say so (a ``measurement-skipped`` event); training goes on."""
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        release(exc)
        nxt = self.memory.lower(kind, self._configured(kind)[1])
        what = "steps per SLQ run" if kind == "density" else "Hessian-vector products"
        self.budget.skip(
            kind,
            "out-of-memory",
            f"one ran out of memory ({type(exc).__name__}: {first}); the next ones take at "
            f"most {nxt} {what}",
            max_products=nxt,
        )

    def _follow(self, kind: str) -> None:
        """A non-zero rank's share of a measurement rank 0 has decided to run."""
        assert self.shard is not None
        try:
            losses = kind != "gram" or not self._gram_worked
            sharded_check_finite(
                self.model, self.loss_fn, self.probe, self.shard, self.forward, losses=losses
            )
        except Exception:  # agreed on every rank: rank 0 says why
            return
        error: BaseException | None = None
        try:
            if kind == "gram":
                sharded_gram(
                    self.model,
                    self.loss_fn,
                    self.probe,
                    self.shard,
                    forward=self.forward,
                    chunk_size=self.opts.chunk_size,
                )
                if self.opts.distance_layers:
                    sharded_activations(
                        self.model, self.probe, self.opts.distance_layers, self.shard, self.forward
                    )
                self._gram_worked = True
            else:
                error = serve_hvps(
                    self.model,
                    self.loss_fn,
                    self.probe,
                    self.shard,
                    forward=self.forward,
                    chunk_size=self.opts.chunk_size,
                )
        except Exception as exc:  # agreed: rank 0's measurement fails too
            error = exc
        if error is not None:
            log.warning(
                f"stiffmon: rank {self.shard.rank}: {kind} share failed: "
                f"{type(error).__name__}: {error}"
            )

    def _disable(self, kind: str, exc: BaseException) -> None:
        """Turn ``kind`` off after ``exc``: a recognised cause leads the message in words, with
        torch's own error after it; otherwise the error and where it was raised."""
        where = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
        detail = f"{type(exc).__name__}: {exc}" + (
            f" ({where.filename}:{where.lineno})" if where else ""
        )
        from stiffmon_agent.failure_hints import failure_hint  # only when a metric fails

        hint = failure_hint(kind, self.model, self.probe, self.forward, exc, self.loss_fn)
        if hint:  # torch's words after it, unless they are the hint's
            detail = hint if hint == str(exc) else f"{hint} ({type(exc).__name__}: {exc})"
        self.disabled[kind] = detail
        log.warning(f"stiffmon: {kind} metric failed and is disabled, training goes on: {detail}")
        self.event("metric-error", f"{kind} failed: {detail}", level="error", metric=kind)
        self.event(
            "metric-disabled",
            f"{kind} disabled for the rest of the run",
            level="warning",
            metric=kind,
        )


def _hvps_used(msgs: list[Outgoing]) -> int:
    """Hessian-vector products a measurement's ``scalars`` say it used (0 for a Gram)."""
    for m in msgs:
        if m.cls is p.Scalars:
            values = dict(zip(m.fields["values_names"], m.fields["values_raw"], strict=True))
            for name in ("sharpness/hvps", "curvature/hvps"):
                used = values.get(name)
                if isinstance(used, int | float) and math.isfinite(used):
                    return int(used)
    return 0
