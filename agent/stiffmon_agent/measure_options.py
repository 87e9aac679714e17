"""The agent's settings of the heavy measurements, and the keyword arguments each one takes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class MeasureOptions:
    """Settings of the Gram (stiffness / noise), sharpness and density measurements.

    The fields are the :class:`~stiffmon_agent.agent.Agent` keyword arguments of the same names
    (documented there); each method gives the keyword arguments of one measurement function.
    """

    distance_layers: tuple[str, ...]
    distance_bins: int
    noise_k: int
    hessian_k: int
    hessian_tol: float
    max_hvps: int
    density_runs: int
    density_steps: int
    trace_samples: int
    batch_test_theta: tuple[float, float, float]
    chunk_size: int | None

    def gram(self) -> dict[str, Any]:
        """Keyword arguments of :func:`~stiffmon_agent.measure.gram_messages`."""
        return {
            "distance_layers": self.distance_layers,
            "distance_bins": self.distance_bins,
            "noise_k": self.noise_k,
            "chunk_size": self.chunk_size,
            "batch_test_theta": self.batch_test_theta,
        }

    def density(self) -> dict[str, Any]:
        """Keyword arguments of :func:`~stiffmon_agent.measure_curvature.density_messages`."""
        return {
            "runs": self.density_runs,
            "steps": self.density_steps,
            "trace_samples": self.trace_samples,
            "chunk_size": self.chunk_size,
        }

    def density_hvps(self) -> int:
        """Hessian-vector products a density measurement uses at most."""
        return self.density_runs * self.density_steps + self.trace_samples

    def sharpness(self) -> dict[str, Any]:
        """Keyword arguments of :func:`~stiffmon_agent.measure.sharpness_messages`."""
        return {
            "k": self.hessian_k,
            "tol": self.hessian_tol,
            "max_hvps": self.max_hvps,
            "chunk_size": self.chunk_size,
        }
