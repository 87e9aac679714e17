"""stiffmon: a live monitor for the geometry of neural-network training.

The monitor side (this package) never imports torch; the in-loop agent is ``stiffmon_agent``.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
