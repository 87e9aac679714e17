"""Soft segmentation masks (probability targets over dimension 1, as ``CrossEntropyLoss`` reads
(N, C, H, W) inputs: mixup or CutMix on masks, distillation from a segmentation teacher) get
the soft targets' way out (their argmax over the classes) alone, not also the regression's."""

from __future__ import annotations

import pytest
import torch

from stiffmon_agent.accuracy_reasons import check_comparable


def test_soft_masks_get_the_argmax_advice_alone() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 3, 5)
    masks = torch.softmax(torch.randn(2, 4, 3, 5), dim=1)  # each pixel's classes sum to 1
    with pytest.raises(ValueError) as info:
        check_comparable(logits, masks)
    said = str(info.value)
    assert "for soft targets, pass their argmax over the classes as targets=" in said
    assert "regression loss" not in said


def test_real_valued_maps_still_get_the_regression_advice() -> None:
    torch.manual_seed(0)
    depth = torch.rand(2, 4, 3, 5) * 3  # a dense regression (depth), values beyond 1
    with pytest.raises(ValueError) as info:
        check_comparable(torch.randn(2, 4, 3, 5), depth)
    said = str(info.value)
    assert "regression loss" in said and "argmax" not in said


def test_square_segmentation_logits_are_read_channels_first() -> None:
    """(N, C, H, W) logits with C = H = W fit both layouts; a segmentation's accuracy is the
    share of pixels whose argmax over dimension 1 (CrossEntropyLoss's classes) is their class,
    own count against the agent's (the classes-last reading, argmax over W, gave 0.21 for 0.71)."""
    from stiffmon_agent.accuracy import Accuracy, accuracies

    torch.manual_seed(3)
    targets = torch.randint(0, 5, (4, 5, 5))
    logits = torch.randn(4, 5, 5, 5) + 3.0 * torch.nn.functional.one_hot(targets, 5).permute(
        0, 3, 1, 2
    ) * (torch.rand(4, 1, 5, 5) < 0.6)
    assert check_comparable(logits, targets) == 1
    own = float((logits.argmax(1) == targets).double().mean())
    last = float((logits.argmax(-1) == targets).double().mean())
    assert abs(own - last) > 0.2
    a = Accuracy.of(logits, targets, None, None)
    assert float(a) == pytest.approx(own, abs=1e-12)
    assert accuracies([a, a]).tolist() == pytest.approx([own, own], abs=1e-12)
