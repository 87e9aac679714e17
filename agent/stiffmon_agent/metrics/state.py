"""Measure without side effects: eval mode, then the model exactly as it was."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import torch
from torch import nn


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Named parameters that require grad (frozen ones are excluded), shared ones once."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


@contextmanager
def measurement_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode for a measurement and restore everything afterwards.

    Inside: every module in eval mode (BatchNorm uses running statistics, dropout is off) and
    gradients enabled. Afterwards, also when the measurement raised: each module's ``training``
    flag, every buffer's value, the weights of ``Embedding(max_norm=…)`` (renormalised in place
    by its forward), each parameter's ``.grad`` (the same tensor object and values),
    and the CPU and CUDA random-number-generator states are as they were. The optimizer is never
    touched.
    """
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
    with torch.random.fork_rng(devices=devices), torch.enable_grad(), ExitStack() as stack:
        stack.enter_context(_math_attention())
        if any(isinstance(m, nn.RNNBase) for m in model.modules()):
            # cuDNN's RNN has no backward in eval mode and no double backward: native kernels
            stack.enter_context(torch.backends.cudnn.flags(enabled=False))
        try:
            model.eval()
            yield model
        finally:
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
