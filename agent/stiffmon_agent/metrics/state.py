"""Measure without side effects: eval mode, then the model exactly as it was."""

from __future__ import annotations

import contextlib
import random
import threading
import weakref
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from stiffmon_agent.freq_scaled import unscaled
from stiffmon_agent.metrics.deferred_interrupt import held_interrupts, hold, release
from stiffmon_agent.metrics.optimizer_kind import number
from stiffmon_agent.metrics.plain_weight_norm import plain_weight_norm


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Named parameters that require grad (frozen ones are excluded), shared ones once."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def dense(t: Tensor) -> Tensor:
    """``t`` as a strided tensor: the gradient of an ``Embedding(sparse=True)`` weight, and its
    Hessian-vector product, come back sparse (duplicate indices are summed)."""
    return t.to_dense() if t.layout != torch.strided else t


def flat_grads(grads: Sequence[Tensor | None], params: Sequence[Tensor]) -> Tensor:
    """Gradients (or products) of ``params`` flattened into one vector: zeros where a parameter
    does not enter the loss (None), sparse ones made dense."""
    return torch.cat(
        [
            (dense(g) if g is not None else torch.zeros_like(q)).reshape(-1)
            for g, q in zip(grads, params, strict=True)
        ]
    )


def _autocast_enabled(device_type: str) -> bool:
    """Whether autocast is on for ``device_type`` here (torch < 2.4 asks per device kind)."""
    try:
        return bool(torch.is_autocast_enabled(device_type))  # type: ignore[call-arg]
    except TypeError:
        if device_type == "cpu":
            return bool(torch.is_autocast_cpu_enabled())
        return bool(torch.is_autocast_enabled())


@contextmanager
def _own_forward(model: nn.Module) -> Iterator[None]:
    """Run the model's own ``forward`` inside: accelerate's mixed precision
    (``Accelerator(mixed_precision="bf16")``, the ``Trainer``'s ``bf16=True``) replaces
    ``model.forward`` by an autocast wrapper, keeping the own one as ``model._original_forward``;
    the wrapper would switch autocast on again inside the measurement."""
    wrapped, original = model.__dict__.get("forward"), model.__dict__.get("_original_forward")
    if wrapped is None or original is None:
        yield
        return
    model.forward = original
    try:
        yield
    finally:
        model.forward = wrapped


_MEASURING = threading.RLock()
"""One measurement at a time in the process. What :func:`measurement_mode` switches is
process-global (the SDPA backend flags, cuDNN's flags, the RNG states): two threads that save
and restore it interleaved (A in, B in, A out, B out) leave B's saved inside state for good,
e.g. scaled_dot_product_attention on the math kernel only for the rest of the process."""

_noted = threading.local()

THREADS_NOTE = (
    "other Python threads run in this process (trials in threads: Optuna n_jobs, Ray Tune's "
    "local mode, a ThreadPoolExecutor): the agent measures one model at a time (a process-wide "
    "lock, as the states it switches are process-global); while it measures, every thread's "
    "scaled_dot_product_attention runs on the math kernel (another thread's attention output "
    "then differs in the last bits, about 1e-7 in float32) and the probe's forward runs with "
    "torch's default generator seeded (another thread's draws at that moment come out the same "
    "at every measurement); torch's, numpy's and Python's global random states are not put "
    "back afterwards (that would rewind, and so repeat, the other threads' draws): draws from "
    "those global generators are not reproducible across threads anyway; give each trial its "
    "own torch.Generator / numpy Generator to make its randomness its own"
)
"""Why a measurement next to other threads is not free of side effects on them."""


def other_threads() -> list[str]:
    """Names of the other live non-daemon Python threads (a ThreadPoolExecutor's workers, the
    main thread while the agent runs in a worker); daemon ones (the agent's publishers,
    DataLoader pin-memory threads, a notebook's kernel threads) draw no training randomness."""
    me = threading.current_thread()
    return [t.name for t in threading.enumerate() if t is not me and not t.daemon and t.is_alive()]


_told: weakref.WeakSet[Any] = weakref.WeakSet()


def threads_note(owner: Any) -> str | None:
    """:data:`THREADS_NOTE` the first time ``owner`` (an agent: one event per trial, also when a
    pool's thread runs the next trial) asks after a measurement in this thread ran next to other
    threads; else None."""
    if not getattr(_noted, "pending", False):
        return None
    _noted.pending = False
    if owner in _told:
        return None
    _told.add(owner)
    return THREADS_NOTE


@contextmanager
def measurement_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode for a measurement and restore everything afterwards.

    Inside: every module in eval mode (BatchNorm uses running statistics, dropout is off),
    gradients enabled and autocast off (a ``step()`` called inside the training's
    ``torch.autocast`` block measures in the weights' own dtype, not in bfloat16), weight norms
    in plain ops (:mod:`.plain_weight_norm`: torch's fused one has a wrong second derivative).
    Afterwards, also when the measurement raised: each module's ``training`` flag, every
    buffer's value, the weights of ``Embedding(max_norm=…)`` (renormalised in place
    by its forward), each parameter's ``.grad`` (the same tensor object and values),
    and the random-number-generator states (torch's CPU and CUDA ones, ``numpy.random``'s and
    Python's ``random``'s: a forward that draws with them leaves the training's draws as they
    would have been without the measurement) are as they were. The optimizer is never
    touched. A Ctrl-C (SIGINT) during the set-up or the restoration is held back until the
    model is whole again (:mod:`.deferred_interrupt`), then raised; one during the
    measurement itself is raised at once, and the model restored on the way out.

    Next to other threads (:func:`other_threads`): one measurement at a time in the process
    (:data:`_MEASURING`), and the global random states are left as the measurement left them,
    as restoring them would rewind the draws other threads made meanwhile (:data:`THREADS_NOTE`).
    """
    with _MEASURING:  # waiting here is interruptible; nothing is changed yet
        hold()  # a Ctrl-C while the model is changed or put back is raised once it is whole
        try:
            with _measured(model) as measured:
                yield measured
        finally:
            release()


@contextmanager
def _measured(model: nn.Module) -> Iterator[nn.Module]:
    """:func:`measurement_mode` inside its interrupt hold (entered held, yields released)."""
    modes = {m: m.training for m in model.modules()}
    # Embedding(max_norm=…) renormalises rows of its weight in place during the forward: keep
    # a copy of those weights so that a measurement never changes a parameter
    renormed = {
        m.weight: m.weight.detach().clone()
        for m in model.modules()
        if isinstance(m, nn.Embedding) and m.max_norm is not None
    }
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    grads = {
        p: (p.grad, None if p.grad is None else p.grad.detach().clone()) for p in model.parameters()
    }
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    shared = bool(other_threads())
    if shared:
        _noted.pending = True
    np_state, py_state = np.random.get_state(), random.getstate()
    with (
        contextlib.nullcontext() if shared else torch.random.fork_rng(devices=devices),
        torch.enable_grad(),
        ExitStack() as stack,
    ):
        stack.enter_context(_math_attention())
        stack.enter_context(plain_weight_norm(model))  # torch._weight_norm: wrong 2nd derivative
        stack.enter_context(_own_forward(model))  # accelerate's autocast wrapper: not measured
        stack.enter_context(unscaled(model))  # Embedding(scale_grad_by_freq): true derivatives
        for device_type in ("cpu", "cuda"):  # step() inside the user's autocast block
            if _autocast_enabled(device_type):
                stack.enter_context(torch.autocast(device_type, enabled=False))
        if any(isinstance(m, nn.RNNBase) for m in model.modules()):
            # cuDNN's RNN has no backward in eval mode and no double backward: native kernels
            stack.enter_context(torch.backends.cudnn.flags(enabled=False))
        try:
            model.eval()
            release()  # a Ctrl-C held during the set-up is raised here: the finally undoes it
            yield model
        finally:
            hold()
            if not shared:  # else: other threads drew meanwhile; setting them back rewinds those
                np.random.set_state(np_state)
                random.setstate(py_state)
            for m, training in modes.items():
                m.training = training
            with torch.no_grad():
                for name, b in model.named_buffers():
                    saved = buffers.get(name)
                    if saved is not None and saved.shape == b.shape:
                        b.copy_(saved)
                for w, saved_w in renormed.items():
                    w.copy_(saved_w)
                for p, (grad, values) in grads.items():
                    if grad is not None and values is not None:
                        grad.copy_(values)
                    p.grad = grad


def _math_attention() -> contextlib.AbstractContextManager[None]:
    """``sdpa_kernel(SDPBackend.MATH)`` where this torch has it, else nothing."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - older torch
        return contextlib.nullcontext()
    return sdpa_kernel(SDPBackend.MATH)


@contextmanager
def optimized_only(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    groups: Sequence[dict[str, Any]] | None = None,
) -> Iterator[None]:
    """Measure the parameters the optimizer moves: trainable parameters it does not hold (a
    linear probe's backbone left ``requires_grad=True``), and those it holds only in param groups
    at η = 0 while another group moves (a backbone "frozen" by a zero learning rate), are frozen
    for the measurement and restored afterwards.

    A step θ_g ← θ_g − η_g ∇_g L leaves a group at η_g = 0 where it is, so the Hessian, Gram and
    noise of the step are those restricted to the moving groups (the threshold ignores a still
    group too). Nothing changes without an optimizer, when it holds them all, or when it holds
    none of them (an EMA / averaged copy of the trained model: measured whole); when every group
    that holds a trainable parameter is at η = 0 (the first step of a warm-up from 0), nothing
    moves and the held ones are measured whole.

    Args:
        model: The measured model.
        optimizer: The training's optimizer (None: everything is measured).
        groups: The param groups as the measured step used them (their ``lr``); default the
            optimizer's own.
    """
    extra, total = unoptimized(model, optimizer)
    if extra and len(extra) == total:
        yield
        return
    left_out = extra + still_parameters(model, optimizer, groups)
    if not left_out:
        yield
        return
    try:
        with held_interrupts():  # a Ctrl-C half-way would leave some frozen for good
            for p in left_out:
                p.requires_grad_(False)
        yield
    finally:
        with held_interrupts():
            for p in left_out:
                p.requires_grad_(True)


def _zero_lr(group: dict[str, Any]) -> bool:
    """Whether the group's learning rate (a number or a one-element tensor) is exactly 0."""
    lr = group.get("lr")
    try:
        return lr is not None and number(lr) == 0.0
    except (TypeError, ValueError, RuntimeError):  # not a number: not known to be still
        return False


def still_parameters(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    groups: Sequence[dict[str, Any]] | None = None,
) -> list[nn.Parameter]:
    """The trainable parameters of ``model`` that the optimizer holds only in groups at η = 0,
    where some held trainable parameter is in a group at η ≠ 0 (else none: nothing moves, or
    everything does)."""
    if optimizer is None:
        return []
    trainable = {id(p): p for p in trainable_parameters(model).values()}
    moving: set[int] = set()
    held: set[int] = set()
    for g in groups if groups is not None else optimizer.param_groups:
        ids = {id(p) for p in g.get("params", ()) if id(p) in trainable}
        held |= ids
        if not _zero_lr(g):
            moving |= ids
    if not moving:
        return []
    return [trainable[i] for i in held - moving]


def unoptimized(
    model: nn.Module, optimizer: torch.optim.Optimizer | None
) -> tuple[list[nn.Parameter], int]:
    """(the trainable parameters of ``model`` the optimizer does not hold, how many trainable
    ones it has); none without an optimizer."""
    if optimizer is None:
        return [], 0
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    trainable = list(trainable_parameters(model).values())
    return [p for p in trainable if id(p) not in held], len(trainable)
