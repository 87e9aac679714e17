"""Shared driver of the torchvision demos in ``demos/`` (MNIST, Fashion-MNIST, CIFAR-10/100).

The setups follow the stiffness paper (Fort et al. 2019): fully connected and convolutional
networks trained with SGD, a fixed probe of a few examples per class from the training and the
test split. ``--fake-data`` swaps in ``torchvision.datasets.FakeData`` of the same shape (for smoke
tests and machines without the data); without it a missing dataset is a clear error that says how
to get it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import torch
from torch import Tensor, nn

from stiffmon_agent import Agent

SHAPES = {
    "MNIST": (1, 28, 28, 10),
    "FashionMNIST": (1, 28, 28, 10),
    "CIFAR10": (3, 32, 32, 10),
    "CIFAR100": (3, 32, 32, 100),
}


def parser(description: str, default_lr: float = 0.05) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--data-dir", default="./data", help="where the dataset lives (or goes)")
    ap.add_argument("--download", action="store_true", help="download the dataset if absent")
    ap.add_argument("--fake-data", action="store_true", help="random images of the right shape")
    ap.add_argument("--lr", type=float, default=default_lr)
    ap.add_argument("--momentum", type=float, default=0.0)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--per-class", type=int, default=10, help="probe examples per class")
    ap.add_argument("--every", type=int, default=100, help="steps between heavy measurements")
    ap.add_argument(
        "--endpoint", default=None, help="tcp://host:port (default: first free from 5555)"
    )
    ap.add_argument("--record", default=None, help="record to this .stiff file")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return ap


def load(
    name: str, args: argparse.Namespace, train: bool
) -> tuple[Tensor, Tensor, tuple[str, ...]]:
    """The whole split as tensors (normalised per channel)."""
    import torchvision
    from torchvision import transforms

    c, h, w, k = SHAPES[name]
    if args.fake_data:
        size = 512 if train else 256
        ds = torchvision.datasets.FakeData(
            size=size,
            image_size=(c, h, w),
            num_classes=k,
            transform=transforms.ToTensor(),
            random_offset=0 if train else 10_000,
        )
        classes = tuple(str(i) for i in range(k))
    else:
        try:
            ds = getattr(torchvision.datasets, name)(
                args.data_dir, train=train, download=args.download, transform=transforms.ToTensor()
            )
        except RuntimeError as exc:
            sys.exit(
                f"{name} is not in {args.data_dir} ({exc}). Pass --download to fetch it "
                f"(needs internet), point --data-dir at a copy, or try --fake-data."
            )
        classes = tuple(getattr(ds, "classes", [str(i) for i in range(k)]))
    xs = torch.stack([ds[i][0] for i in range(len(ds))])
    ys = torch.tensor([int(ds[i][1]) for i in range(len(ds))])
    mean = xs.mean(dim=(0, 2, 3), keepdim=True)
    std = xs.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    return (xs - mean) / std, ys, classes


def probe(x: Tensor, y: Tensor, per_class: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    idx = []
    for c in torch.unique(y):
        where = torch.nonzero(y == c).flatten()
        idx.append(where[torch.randperm(len(where), generator=g)[:per_class]])
    sel = torch.cat(idx)
    return x[sel], y[sel]


def run(
    name: str, model_fn: Callable[[int, int, int], nn.Module], args: argparse.Namespace
) -> None:
    """Train ``model_fn(channels, side, classes)`` on dataset ``name`` with an agent attached."""
    torch.manual_seed(0)
    c, h, _, k = SHAPES[name]
    x_train, y_train, classes = load(name, args, train=True)
    x_test, y_test, _ = load(name, args, train=False)
    dev = torch.device(args.device)
    model = model_fn(c, h, k).to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum)
    with Agent(
        model,
        nn.CrossEntropyLoss(),
        opt,
        probe=probe(x_train, y_train, args.per_class),
        val_probe=probe(x_test, y_test, args.per_class, seed=1),
        class_names=classes,
        run=f"{name} sgd lr={args.lr:g}",
        endpoint=args.endpoint,
        record=args.record,
        gram_every=f"first:3,every:{args.every}",
        sharpness_every=f"first:3,every:{args.every}",
        batch_size=args.batch_size,
    ) as agent:
        g = torch.Generator().manual_seed(1)
        for _ in range(args.steps):
            i = torch.randint(0, len(y_train), (args.batch_size,), generator=g)
            xb, yb = x_train[i].to(dev), y_train[i].to(dev)
            out = model(xb)
            loss = nn.functional.cross_entropy(out, yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            agent.step(loss, out, yb)
    print(f"done: {args.steps} steps" + (f", recorded to {args.record}" if args.record else ""))


def mlp(c: int, side: int, k: int, hidden: int = 512, depth: int = 2) -> nn.Module:
    layers: list[nn.Module] = [nn.Flatten()]
    width = c * side * side
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    return nn.Sequential(*layers, nn.Linear(width, k))


def cnn(c: int, side: int, k: int, width: int = 32) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(c, width, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(2 * width * (side // 4) ** 2, 128),
        nn.ReLU(),
        nn.Linear(128, k),
    )
