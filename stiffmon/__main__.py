"""``python -m stiffmon``: the same as the ``stiffmon`` command."""

from __future__ import annotations

import sys

from stiffmon.cli import main

sys.exit(main())
