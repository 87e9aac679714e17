"""The learning-rate sweep that ``stiffmon demo`` runs, written out to copy from.

    python demos/digits_lr_sweep.py                    # three runs, monitor attached
    python demos/digits_lr_sweep.py --no-tui --out runs --lrs 0.01,0.1,0.5 --steps 3000

Each learning rate trains in its own process (``python -m stiffmon_agent.demo.train``, a
plain SGD loop with an ``Agent``: read that module for the three lines that matter) on
scikit-learn's bundled 8×8 digits, with the same seed, split and probe. Needs
``pip install "stiffmon[demos]"``.
"""

from __future__ import annotations

import sys

from stiffmon.cli import main

if __name__ == "__main__":
    sys.exit(main(["demo", *sys.argv[1:]]))
