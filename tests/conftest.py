"""Shared test configuration."""

from __future__ import annotations

import os

from hypothesis import settings

# Timing varies a lot on shared 2-core CI machines: no per-example deadlines.
settings.register_profile("default", deadline=None)
settings.register_profile("ci", deadline=None, derandomize=True, print_blob=True)
settings.load_profile("ci" if os.environ.get("CI") else "default")
