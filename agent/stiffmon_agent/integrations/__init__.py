"""Callbacks that attach the agent to training frameworks.

* :mod:`stiffmon_agent.integrations.lightning` — ``StiffmonCallback`` for PyTorch Lightning ≥ 2
  (``pip install "stiffmon[lightning]"``);
* :mod:`stiffmon_agent.integrations.transformers` — ``StiffmonCallback`` for the Hugging Face
  ``Trainer`` (``pip install "stiffmon[transformers]"``).
* :mod:`stiffmon_agent.integrations.accelerate` — ``AccelerateAgent`` for a plain loop prepared
  by an ``accelerate.Accelerator`` (``pip install "stiffmon[accelerate]"``; it does not
  import accelerate).

Importing this package imports neither framework; each submodule imports only its own.
"""

from __future__ import annotations
