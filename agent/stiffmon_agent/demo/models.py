"""Small models for the bundled 8×8 digits (the stiffness paper's fully connected and conv nets)."""

from __future__ import annotations

from torch import nn


def digits_mlp(hidden: int = 128, depth: int = 2) -> nn.Module:
    """Fully connected ReLU net 64 → hidden × depth → 10."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = 64
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    layers.append(nn.Linear(width, 10))
    return nn.Sequential(*layers)


def digits_cnn(channels: int = 16) -> nn.Module:
    """Two 3×3 convolutions and two linear layers on 1×8×8 digits (about 25k parameters)."""
    return nn.Sequential(
        nn.Conv2d(1, channels, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(channels, 2 * channels, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(2 * channels * 4 * 4, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )
