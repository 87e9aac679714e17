"""The in-loop agent: three lines in a training script, live metrics for any number of monitors.

The agent composes *when* (:mod:`~stiffmon_agent.schedules`), *what*
(:mod:`~stiffmon_agent.measure`, built on :mod:`~stiffmon_agent.metrics`) and *where*
(:class:`~stiffmon_agent.publisher.Publisher`: sockets, history, session file, on a background
thread). It never blocks, crashes or noticeably slows the training loop: socket work happens on
the background thread behind a bounded queue; an exception inside a metric becomes an ``event``
and disables that metric; a NaN loss becomes an ``event``; heavy measurements are skipped when
the agent's whole cost would slow the run by more than ``overhead_cap``. Under torch.distributed
with ``distributed=True`` every rank measures its share of the probe (:mod:`~.runner`).
"""

from __future__ import annotations

import atexit
import math
import os
import socket
import time
import uuid
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from stiffmon import protocol as p
from stiffmon.transport import CurveKeys
from stiffmon_agent import distributed as sharding
from stiffmon_agent import termination
from stiffmon_agent.accuracy import (
    binary_threshold,
    class_ignore_index,
    step_accuracy,
)
from stiffmon_agent.agent_join import JoinableAgent
from stiffmon_agent.agent_measuring import MeasuringAgent
from stiffmon_agent.agent_notes import construction_warnings
from stiffmon_agent.agent_output import LIVE_AGENTS, AgentOutput
from stiffmon_agent.announce import (
    count_weighting_sayer,
    dist_rank,
    hello_fields,
    log,
    probe_notes,
    register_locally,
    speaker,
    start_publisher,
    startup_line,
)
from stiffmon_agent.budget import MeasurementBudget
from stiffmon_agent.class_target import ClassTarget
from stiffmon_agent.columns import DEFAULT_INTERVAL, ColumnBatcher
from stiffmon_agent.measure import (  # noqa: F401  (the runner calls them from here: patchable)
    ProbeSet,
    SharpnessState,
    gram_messages,
    make_probe,
    sharpness_messages,
)
from stiffmon_agent.measure_curvature import density_messages  # noqa: F401
from stiffmon_agent.measure_options import MeasureOptions
from stiffmon_agent.metrics.probe import (
    Batch,
    ForwardFn,
    LossFn,
)
from stiffmon_agent.optimizer_read import default_run_name, framework_inner, optimizer_config
from stiffmon_agent.optimizer_skips import OptimizerSkips
from stiffmon_agent.optimizer_swap import OptimizerSwap
from stiffmon_agent.probe_set import build_probe, objective_loss
from stiffmon_agent.publisher import Publisher
from stiffmon_agent.rank_batches import RankBatches
from stiffmon_agent.rank_gate import RankGate
from stiffmon_agent.runner import MeasurementRunner
from stiffmon_agent.schedules import EveryK, MeasurementPlan, Schedule, parse_schedule
from stiffmon_agent.step_scalars import OptimizerColumns
from stiffmon_agent.sum_over_option import sharpness_state

DENSITY_EVERY = EveryK(500, start=500)  # the costliest measurement: not at step 0


@atexit.register
def _close_all() -> None:  # the user forgot close(): flush and leave cleanly
    reason = termination.exit_reason()
    for agent in list(LIVE_AGENTS):
        agent.close(reason=reason, timeout=2.0)


class Agent(AgentOutput, MeasuringAgent, OptimizerSwap, JoinableAgent):
    """Measure stiffness, sharpness and gradient noise inside a training loop and publish them.

    Args:
        model: The network being trained.
        loss_fn: The training loss (``torch.nn`` loss module or per-example callable).
        optimizer: The optimizer; learning rate, momentum etc. are read from it at every step.
        probe: Fixed train examples ``(inputs, targets)`` (e.g. 20 per class) for the heavy
            metrics; None: only per-step scalars.
        val_probe: Optional fixed validation examples (train–val and val–val class
            stiffness; left out when the probe has no class labels).
        run: Display name (default: ``"<optimizer> lr=<lr>"``).
        endpoint: ``tcp://host:port`` to publish on (snapshot port = port + 1). Default:
            127.0.0.1 and the first free pair from 5555. ``""``: do not publish.
        record: Optional ``.stiff`` file to record every message to.
        class_names: Names of the classes, in label order.
        num_classes: Number of classes (default: from the probe labels / class names).
        class_target: Where structured probe targets hold the class indices, for the class
            stiffness: a key of dict targets (``"label"``), an index of tuple targets, or a
            callable targets -> (N,) class indices (given the whole targets, train ∪ val); one
            that names no class indices raises here. None: the targets themselves.
        forward: ``forward(model, inputs)`` for models not called as ``model(inputs)``.
        gram_every: Schedule of the stiffness / noise measurement (one Gram matrix): an int k,
            ``"every:k"``, ``"log:m"``, ``"first:n,every:k"`` or ``"never"``.
        sharpness_every: Schedule of the sharpness measurement.
        density_every: Schedule of the Hessian trace + spectral density measurement (stochastic
            Lanczos quadrature, ``density_runs × density_steps + trace_samples`` HVPs). Default:
            every 500 steps from step 500, so that it never delays the start of training.
        overhead_cap: Largest slowdown the agent may cause, as a fraction of the training's own
            time (0.02: the run takes at most 1.02 × as long). It counts the heavy measurements,
            and twice the time ``step()`` itself takes and the publisher thread's CPU time
            (what the stream costs the training beside its own time). Due
            measurements are skipped (and an ``event`` says so) to stay under it. None or 1: no
            cap. The step-0 Gram measurement always runs, and counts.
        distance_layers: Module names whose activations get a stiffness-vs-distance curve.
        distance_bins: Bins of the stiffness-vs-distance curves.
        noise_k: How many eigenvalues of the gradient covariance to publish.
        hessian_k: How many Hessian eigenvalues to track.
        hessian_tol: Lanczos tolerance (1e-2: each eigenvalue within 1 %).
        max_hvps: HVP budget per sharpness measurement.
        density_runs: Lanczos runs of the density (each is also a trace sample).
        density_steps: Lanczos steps per density run.
        trace_samples: Extra Hutchinson samples for the trace, one HVP each.
        batch_test_theta: θ of the norm and inner-product tests and ν of the orthogonality test
            for the suggested batch sizes (Bollapragada et al.'s 0.9, 0.9, 5.84).
        chunk_size: Probe examples per forward/backward pass (bounds memory).
        batch_size: Training batch size B: reported, and needed for the sharpness of a
            sum-reduced loss (B × the per-example mean). None: taken from the logits passed to
            :meth:`step` (their first dimension) and published with every step as the scalar
            ``batch_size``.
        sum_over: For a sum-reduced loss, the examples whose losses the objective adds up per
            optimizer step after the loop's own scaling, where that is not B: with gradient
            accumulation over micro-batches of m and ``(loss / k).backward()`` it is m; under
            DDP (gradients averaged over the ranks) B / W. None: B, or with a DDP-wrapped
            model B / W (with ``distributed=True`` B = every rank's batch at a measurement).
            Given with a mean-reduced loss (which ignores it): a ``sum-over-ignored`` warning.
        rank0_only: Under torch.distributed, only rank 0 publishes (and, unless
            ``distributed``, measures: the other ranks' agents are no-ops).
        distributed: Shard the heavy measurements over the torch.distributed ranks: every rank
            creates the agent with the same arguments (the same global probe) and calls
            ``step()``; each measures its share, rank 0 assembles and publishes. Off by default
            (an agent made on rank 0 only must not wait); one process: no change.
        rank_timeout: With ``distributed``, seconds a rank waits for the others' agents: at
            construction (then every rank raises, naming the missing ranks) and before each
            measurement (then sharding stops with a ``sharding-off`` warning event and rank 0
            measures alone): nobody waits in a collective for ever.
        curve_keys: Directory from ``stiffmon keys``: require CURVE authentication.
        fsync: fsync policy of the session file (``"never"``, ``"always"`` or seconds).
        queue_size: Bound of the queue to the publisher thread.
        batch_interval: Seconds between the per-step batches sent (and drains of the queue)
            while a monitor subscribes: the live stream's latency, and at most what a SIGKILL
            of the process loses. Shorter costs more publisher CPU per step.
        idle_batch_interval: The same while no monitor subscribes (the session file alone
            takes the batches; never shorter than ``batch_interval``); None: ``batch_interval``.
        max_scalar_history: Values of ``scalars`` messages (measurement results, coverage,
            ``Agent.log``) kept for late joiners, over all names (then the busiest name's
            older values are thinned, evenly spread, its newest quarter kept whole); every
            step's per-step scalars are kept.
        registry: Register the run so ``stiffmon watch`` finds it.
        start_step: The first step's number: a script resumed from a checkpoint at step N
            passes N, so that its steps (and the measurement schedules) continue the count.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        probe: tuple[Batch, Batch] | None = None,
        val_probe: tuple[Batch, Batch] | None = None,
        run: str | None = None,
        endpoint: str | None = None,
        record: str | os.PathLike[str] | None = None,
        class_names: Sequence[str] | None = None,
        num_classes: int | None = None,
        class_target: ClassTarget = None,
        forward: ForwardFn | None = None,
        gram_every: Schedule | int | str | None = "first:5,every:50",
        sharpness_every: Schedule | int | str | None = "first:5,every:50",
        density_every: Schedule | int | str | None = DENSITY_EVERY,
        overhead_cap: float | None = 0.02,
        distance_layers: Sequence[str] = (),
        distance_bins: int = 20,
        noise_k: int = 5,
        hessian_k: int = 1,
        hessian_tol: float = 1e-2,
        max_hvps: int = 50,
        density_runs: int = 2,
        density_steps: int = 32,
        trace_samples: int = 8,
        batch_test_theta: tuple[float, float, float] = (0.9, 0.9, 5.84),
        chunk_size: int | None = 128,
        batch_size: int | None = None,
        sum_over: int | None = None,
        rank0_only: bool = True,
        distributed: bool = False,
        rank_timeout: float = 120.0,
        curve_keys: str | os.PathLike[str] | CurveKeys | None = None,
        fsync: Any = "never",
        queue_size: int = 10_000,
        batch_interval: float = DEFAULT_INTERVAL,
        idle_batch_interval: float | None = 0.5,
        max_scalar_history: int = 1_000_000,
        registry: bool = True,
        start_step: int = 0,
    ) -> None:
        # DDP averages the ranks' gradients: B read from one rank's logits is W × theirs
        self._replicas = sharding.replicas(model)
        self.model = sharding.unwrap(model)  # measuring never runs DDP's all-reduce hooks
        self.loss_fn = loss_fn
        optimizer = framework_inner(optimizer)  # accelerate's prepared one: the torch optimizer
        self.optimizer = optimizer
        self.forward = forward
        self.rank = dist_rank()
        self.enabled = not (rank0_only and self.rank != 0)  # publishes
        self.shard = sharding.current_shard(distributed)
        sharding.check_measurable(self.model, probe is not None, self.shard, rank0_only)
        if not rank_timeout > 0:
            raise ValueError(f"rank_timeout must be a positive number of seconds: {rank_timeout}")
        gate = None
        if self.shard is not None:  # every rank's agent is there before any collective
            gate = RankGate.meeting(self.shard, rank_timeout)
            gate.model = self.model
        if isinstance(start_step, bool) or not isinstance(start_step, int) or start_step < 0:
            raise ValueError(f"start_step must be a non-negative int, got {start_step!r}")
        self.step_count = start_step
        self.closed = False
        self.run_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        appending = record is not None and os.path.isfile(record) and os.path.getsize(record) > 0
        self.record_path = None if record is None else os.path.realpath(record)
        cfg = optimizer_config(optimizer)
        self.name = run or default_run_name(cfg)
        self._plan = MeasurementPlan(
            *(
                parse_schedule(e if probe is not None else None)
                for e in (gram_every, sharpness_every, density_every)
            )
        )
        self._opts = MeasureOptions(
            tuple(distance_layers), distance_bins, noise_k, hessian_k, hessian_tol, max_hvps,
            density_runs, density_steps, trace_samples, tuple(batch_test_theta), chunk_size,
        )  # fmt: skip
        self._sharp_state = sharpness_state(batch_size, sum_over, self._replicas)
        # every rank's batch travels with each measurement's decision (the gate's all-reduce)
        self._batches = RankBatches(self._sharp_state, self._replicas, gate)
        self._batch_size = batch_size
        self._log_warned: set[str] = set()
        self._binary = binary_threshold(loss_fn)  # BCE: thresholded, not argmax, accuracy
        self._ignore = class_ignore_index(loss_fn)  # a CE target index (255) not counted
        # the "accuracy-off" event's text, said at the first step without logits (then None);
        # framework callbacks set their own
        self.no_accuracy_note: str | None = (
            "no accuracy: step() gets no logits/targets (pass logits=, targets= for it)"
        )
        self._budget = MeasurementBudget(overhead_cap, self._publishing_seconds, self.event)
        self._registry_run: str | None = None
        self.probe: ProbeSet | None = None
        self._probe_note = ""  # examples left out of the probe (no counted target)
        self.publisher: Publisher | None = None
        self._columns = ColumnBatcher(self._submit_columns, interval=batch_interval)
        self._optimizer_columns = OptimizerColumns(optimizer)
        self._skips = OptimizerSkips(self._submit, self.event)
        self._runner: MeasurementRunner | None = None
        self._next_due: float = math.inf
        if not self.enabled and self.shard is None:
            return
        if probe is not None:
            args = (self.model, loss_fn, probe, val_probe, num_classes, class_names, class_target)
            self.probe, self._probe_note = sharding.agreed(
                build_probe, args, self.shard, self.model
            )
        if self.shard is not None:  # every rank: a rank without the probe must not hang
            sharding.check_same_setup(self.model, self.probe, self._plan.schedules)
        if self.probe is not None:
            said = count_weighting_sayer(self.event)  # at the first measurement, if it applies
            self._runner = MeasurementRunner(
                self.model,
                objective_loss(loss_fn, optimizer, self.probe.train()[1], said),
                optimizer,
                self.probe,
                forward,
                self._opts,
                self._budget,
                self._sharp_state,
                lambda m: self.publisher.submit(m) if self.publisher is not None else None,
                self.event,
                self._columns.flush,
                gate,
            )
            self._runner.stepped_groups = self._optimizer_columns.stepped_groups
            self._next_due = self._plan.next_after(start_step - 1)
        if not self.enabled:
            return
        self.publisher = start_publisher(
            self.run_id, endpoint, record, fsync, queue_size, max_scalar_history, curve_keys
        )
        self.publisher.batch_interval = batch_interval
        self.publisher.idle_interval = idle_batch_interval or batch_interval
        self.publisher.on_wake = self._on_wake
        self._columns.interval = self.publisher.interval
        self.publisher.start()
        self.endpoint = self.publisher.endpoint
        fields = hello_fields(
            self.name, model, cfg, batch_size, class_names, self.probe, self.endpoint, record,
            held_by=optimizer,
        )  # fmt: skip
        self._submit(p.Hello, fields)
        self._budget.who = self._skips.who = speaker(self.name)  # names the run's lines
        notes = probe_notes(self.probe, self._opts.distance_layers, self.model, optimizer)
        for code, note in notes:
            self.event(code, note)
        if self._probe_note:
            self.warn("probe-uncounted", self._probe_note)
        for code, note in construction_warnings(
            self.model, loss_fn, optimizer, measuring=probe is not None, sum_over=sum_over,
            record_path=self.record_path, live=list(LIVE_AGENTS),
        ):  # fmt: skip
            self.warn(code, note)
        if self.endpoint is not None and registry:
            self._registry_run = register_locally(self.run_id, self.name, self.endpoint)
        LIVE_AGENTS.add(self)
        termination.install(lambda: list(LIVE_AGENTS))  # SIGTERM: flush, bye, then die
        # last: a failed construction leaves no hook behind
        self._optimizer_columns.attach(count_backwards=batch_size is None)
        world = self.shard.world if self.shard else 1
        log.info(startup_line(self.name, self.endpoint, record, appending, world))

    # ------------------------------------------------------------------ the training loop

    def step(
        self, loss: Tensor | float, logits: Tensor | None = None, targets: Tensor | None = None
    ) -> None:
        """Record one training step; run the heavy metrics when their schedule is due.

        Call after ``optimizer.step()``. Cheap when nothing is due: the step's values are
        appended to the current columnar batch, which goes to the background thread every
        ~0.25 s (0.5 s while no monitor subscribes) or 8192 steps. A CPU loss is read now (as
        cheap as ``detach()``: a stack of tensors on the background thread cost more); a GPU
        loss is copied (one small kernel: the loop may reuse its buffer, as CUDA graphs do) and
        converted there, so it causes no synchronisation. Every step is kept.

        Args:
            loss: The step's loss (tensor or number).
            logits: Optional model outputs of the step, for the accuracy (without them and
                ``targets``, an ``accuracy-off`` event says once that the run has none).
            targets: Optional targets matching ``logits`` (class indices; 0/1 per output with a
                BCE loss).
        """
        if self.closed:
            return
        if not self.enabled:  # a non-zero rank: its share of the sharded measurements only
            self._batches.seen(logits)
            s = self.step_count
            try:
                if s >= self._next_due:
                    self._measure_due(s)
            finally:
                self.step_count = s + 1
            return
        t0 = time.perf_counter()
        s = self.step_count
        try:  # a Ctrl-C anywhere in here keeps the numbering: the step was taken
            if isinstance(loss, Tensor):  # a CPU scalar is read now (cheaper than detach()), any
                # other copied on its stream: a loss buffer the loop reuses (CUDA graphs, compile's
                # "reduce-overhead") is overwritten before the background thread reads it
                loss = loss.item() if loss.is_cpu and loss.numel() == 1 else loss.detach().clone()
            row: list[Any] = [loss]
            oc = self._optimizer_columns
            row += oc.values()
            now = time.time()
            if oc.skipped_back:  # steps without an optimizer step (GradScaler), told now
                for back in oc.skipped_back:
                    self._skips.note(s - back, now)
            elif self._skips.pending is not None:
                self._skips.tick(now)
            if oc.notes:  # said once each: the loop's order (fourth step), no optimizer step seen
                for code, note, console in oc.notes:
                    self.warn(code, note, console=console)
                oc.notes = []
            if oc.accumulation:  # said once, at about the ninth optimizer step
                self._say_accumulation(oc.accumulation)
                oc.accumulation = 0
            extra = 0
            if logits is not None and targets is not None:
                row.append(
                    step_accuracy(
                        logits, targets, self._log_warned, self._binary, self._ignore, self._no_acc
                    )
                )
                extra = 1
            elif self.no_accuracy_note is not None:  # said once per run
                self.event("accuracy-off", self.no_accuracy_note)
                self.no_accuracy_note = None
            if (b := self._batches.seen(logits)) is not None:
                row.append(b)  # W × rank 0's batch; the hello went out before any batch was seen
                extra |= 2
            # step_time is not sent: the monitor derives it from consecutive row times
            self._columns.add(s, now, oc.row_names(extra), row)
            self._budget.step_seconds += time.perf_counter() - t0
            if s >= self._next_due:
                self._measure_due(s)
        finally:
            self.step_count = s + 1

    def __enter__(self) -> Agent:
        return self

    def __repr__(self) -> str:
        ep = getattr(self, "endpoint", None)
        return f"Agent(run={self.name!r}, id={self.run_id}, endpoint={ep}, step={self.step_count})"
