"""A small transformer text classifier on generated data, watched by stiffmon.

The task is made up on the fly: sequences of 24 tokens from a 64-word vocabulary; the class is
which of four "keyword" groups occurs most often (ties broken by the first occurrence), so
attention has something to find. The stiffness paper also measured a transformer on text.

    python demos/tiny_transformer.py --steps 2000              # then: stiffmon watch
    python demos/tiny_transformer.py --steps 20 --endpoint ""  # smoke run, not publishing
"""

from __future__ import annotations

import argparse

import torch
from torch import Tensor, nn

from stiffmon_agent import Agent

VOCAB, LENGTH, CLASSES = 64, 24, 4


def make_data(n: int, seed: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (n, LENGTH), generator=g)
    groups = tokens % 16  # tokens 0..3 (mod 16) are keywords of classes 0..3
    counts = torch.stack([(groups == c).sum(1) for c in range(CLASSES)], dim=1).float()
    first = torch.stack([(groups == c).float().argmax(1) for c in range(CLASSES)], dim=1).float()
    labels = (counts - first / (10 * LENGTH)).argmax(1)
    return tokens, labels


class TextClassifier(nn.Module):
    def __init__(self, d: int = 64, heads: int = 4, layers: int = 2) -> None:
        super().__init__()
        self.tok = nn.Embedding(VOCAB, d)
        self.pos = nn.Embedding(LENGTH, d)
        layer = nn.TransformerEncoderLayer(d, heads, 2 * d, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, CLASSES)

    def forward(self, tokens: Tensor) -> Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        h = self.encoder(self.tok(tokens) + self.pos(positions))
        return self.head(self.norm(h).mean(dim=1))


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--every", type=int, default=100)
    ap.add_argument("--endpoint", default=None)
    ap.add_argument("--record", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    x, y = make_data(4096, seed=0)
    xv, yv = make_data(512, seed=1)
    model = TextClassifier()
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    with Agent(
        model,
        nn.CrossEntropyLoss(),
        opt,
        probe=(x[:64], y[:64]),
        val_probe=(xv[:64], yv[:64]),
        run=f"transformer sgd lr={args.lr:g} β=0.9",
        endpoint=args.endpoint,
        record=args.record,
        class_names=[f"group {c}" for c in range(CLASSES)],
        batch_size=args.batch_size,
        gram_every=f"first:3,every:{args.every}",
        sharpness_every=f"first:3,every:{args.every}",
        distance_layers=("encoder.layers.1",),
    ) as agent:
        g = torch.Generator().manual_seed(2)
        for _ in range(args.steps):
            i = torch.randint(0, len(y), (args.batch_size,), generator=g)
            out = model(x[i])
            loss = nn.functional.cross_entropy(out, y[i])
            opt.zero_grad()
            loss.backward()
            opt.step()
            agent.step(loss, out, y[i])
    model.eval()
    with torch.no_grad():
        print(f"done: validation accuracy {(model(xv).argmax(1) == yv).float().mean():.3f}")


if __name__ == "__main__":
    main()
