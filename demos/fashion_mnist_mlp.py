"""A fully connected net on Fashion-MNIST, watched by stiffmon (Fort et al. 2019 setup).

    python demos/fashion_mnist_mlp.py --data-dir ./data --download  # then: stiffmon watch
    python demos/fashion_mnist_mlp.py --fake-data --steps 20  # no data needed

Needs `pip install "stiffmon[demos]"` (torch, torchvision).
"""

from __future__ import annotations

from stiffmon_agent.demo.vision import mlp, parser, run

if __name__ == "__main__":
    args = parser(__doc__.splitlines()[0]).parse_args()
    run("FashionMNIST", mlp, args)
