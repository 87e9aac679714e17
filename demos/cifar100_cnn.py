"""A convolutional net on CIFAR-100, watched by stiffmon (Fort et al. 2019 setup).

    python demos/cifar100_cnn.py --data-dir ./data --download  # then: stiffmon watch
    python demos/cifar100_cnn.py --fake-data --steps 20  # no data needed

Needs `pip install "stiffmon[demos]"` (torch, torchvision).
"""

from __future__ import annotations

from stiffmon_agent.demo.vision import cnn, parser, run

if __name__ == "__main__":
    args = parser(__doc__.splitlines()[0]).parse_args()
    run("CIFAR100", cnn, args)
