"""Models and bundled data for ``stiffmon demo`` and the scripts in ``demos/``."""
