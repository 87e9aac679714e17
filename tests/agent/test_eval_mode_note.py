"""The start says when measuring in eval mode changes the model: BatchNorm, Dropout."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from stiffmon_agent.announce import probe_notes
from stiffmon_agent.probe_set import make_probe
from tests.agent.recording import close_and_read, events, offline_agent

PROBE = make_probe((torch.randn(6, 4), torch.arange(6) % 2), None, None, None, None)


def _notes(*layers: nn.Module) -> dict[str, str]:
    return dict(probe_notes(PROBE, (), nn.Sequential(nn.Linear(4, 4), *layers)))


def test_batchnorm_and_dropout_are_named() -> None:
    note = _notes(nn.BatchNorm1d(4), nn.Dropout(0.2))["eval-mode"]
    assert note == (
        "measured in eval mode: BatchNorm uses its running statistics and Dropout is off (as in "
        "evaluation; the training steps use batch statistics and dropout)"
    )


@pytest.mark.parametrize(
    ("layer", "said", "unsaid"),
    [
        (nn.Dropout2d(0.5), "Dropout is off", "BatchNorm"),
        (nn.AlphaDropout(0.1), "the training steps use dropout)", "BatchNorm"),
        (nn.BatchNorm2d(4), "BatchNorm uses its running statistics", "Dropout"),
        (nn.SyncBatchNorm(4), "the training steps use batch statistics)", "Dropout"),
    ],
)
def test_only_the_kinds_present_are_named(layer: nn.Module, said: str, unsaid: str) -> None:
    note = _notes(layer)["eval-mode"]
    assert said in note and unsaid not in note


def test_batchnorm_without_running_statistics_couples_the_examples() -> None:
    note = _notes(nn.BatchNorm1d(4, track_running_stats=False))["eval-mode"]
    assert note == (
        "measured in eval mode: BatchNorm without running statistics normalises over the "
        "probe's examples: the per-example losses are coupled"
    )
    both = _notes(nn.BatchNorm1d(4, track_running_stats=False), nn.Dropout(0.1))["eval-mode"]
    assert both.startswith("measured in eval mode: Dropout is off")
    assert both.endswith("the per-example losses are coupled")


def test_nothing_to_say() -> None:
    assert "eval-mode" not in _notes(nn.ReLU(), nn.Dropout(0.0), nn.LayerNorm(4))
    assert probe_notes(None, (), nn.Sequential(nn.Dropout(0.5))) == []


def test_the_agent_publishes_one_eval_mode_event(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.2), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(12, 4), torch.arange(12) % 2
    rec = tmp_path / "r.stiff"
    agent = offline_agent(
        model, nn.CrossEntropyLoss(), opt, rec, probe=(x, y), gram_every=1000, sharpness_every=1000
    )
    said = events(close_and_read(agent, rec), "eval-mode")
    assert len(said) == 1 and said[0].level == "info"
    assert "BatchNorm uses its running statistics and Dropout is off" in said[0].message
