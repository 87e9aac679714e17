"""Pure metric functions on tensors: per-example Gram, stiffness, gradient noise, sharpness.

No I/O, no sockets, no globals: the agent decides when to call them and where results go.
"""

from __future__ import annotations

from stiffmon_agent.metrics.activations import capture_activations
from stiffmon_agent.metrics.density import SpectralDensity, spectral_density
from stiffmon_agent.metrics.eigen import (
    EigenResult,
    TraceEstimate,
    hutchinson_trace,
    lanczos,
    power_iteration,
)
from stiffmon_agent.metrics.gradient_tests import GradientTests, gradient_tests
from stiffmon_agent.metrics.gram import GramResult, per_example_gradients, per_example_gram
from stiffmon_agent.metrics.noise import GradientNoise, centred_gram, gradient_noise
from stiffmon_agent.metrics.sharpness import HessianOperator, hessian_eigen, hessian_trace
from stiffmon_agent.metrics.state import measurement_mode, trainable_parameters
from stiffmon_agent.metrics.stiffness import (
    ClassStiffness,
    DistanceCurve,
    StiffnessBlocks,
    class_stiffness,
    cosine_block,
    cosine_stiffness,
    critical_length,
    mean_pair_cosine,
    pairwise_distances,
    sign_stiffness,
    stiffness_blocks,
    stiffness_vs_distance,
)
from stiffmon_agent.metrics.thresholds import (
    StabilityThreshold,
    diagonal_preconditioner,
    momentum_warmup,
    preconditioned_threshold_for,
    stability_threshold,
    stability_threshold_for,
)

__all__ = [
    "ClassStiffness",
    "DistanceCurve",
    "EigenResult",
    "GradientNoise",
    "GradientTests",
    "GramResult",
    "HessianOperator",
    "SpectralDensity",
    "StabilityThreshold",
    "StiffnessBlocks",
    "TraceEstimate",
    "capture_activations",
    "centred_gram",
    "class_stiffness",
    "cosine_block",
    "cosine_stiffness",
    "critical_length",
    "diagonal_preconditioner",
    "gradient_noise",
    "gradient_tests",
    "hessian_eigen",
    "hessian_trace",
    "hutchinson_trace",
    "lanczos",
    "mean_pair_cosine",
    "measurement_mode",
    "momentum_warmup",
    "pairwise_distances",
    "per_example_gradients",
    "per_example_gram",
    "power_iteration",
    "preconditioned_threshold_for",
    "sign_stiffness",
    "spectral_density",
    "stability_threshold",
    "stability_threshold_for",
    "stiffness_blocks",
    "stiffness_vs_distance",
    "trainable_parameters",
]
