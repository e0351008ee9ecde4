"""Held-out metrics of training against a hand-computed case."""

import math

import pytest
import torch

from trainer.metrics import add_sums, progress_line, validation_metrics, validation_sums


def _batch():
    # segmentation: 2 x 1 x 1 x 4 voxels; prediction = argmax of the 2 logits
    seg_logits = torch.tensor([[[[[0.0, 0.0, 1.0, 1.0]]], [[[1.0, 1.0, 0.0, 0.0]]]],
                               [[[[1.0, 0.0, 1.0, 1.0]]], [[[0.0, 1.0, 0.0, 0.0]]]]])  # (B=2, 2, 1, 1, 4)
    target = torch.tensor([[[[1, 0, 0, 0]]], [[[0, 1, 1, 0]]]])  # (2, 1, 1, 4)
    # predicted tumour voxels: batch 0 -> {0, 1}; batch 1 -> {1}; target: {0}, {1, 2}
    out = {"seg": seg_logits,
           "tasks": {"t": torch.tensor([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0]])}}  # predicts 0, 1, 0
    labels = {"t": torch.tensor([0, 0, -1])}  # right, wrong, missing
    terms = {"total": torch.tensor(3.0), "seg": torch.tensor(2.0), "task/t": torch.tensor(1.0)}
    return out, target, labels, terms


def test_validation_metrics_by_hand():
    out, target, labels, terms = _batch()
    s = validation_sums(out, target, labels, terms, ["t"])
    # intersection: batch 0 voxel 0, batch 1 voxel 1 = 2; |pred| + |target| = 3 + 3
    assert s["dice_intersection"] == 2 and s["dice_volumes"] == 6
    assert s["correct/t"] == 1 and s["known/t"] == 2
    two = add_sums(s, s)  # a second identical batch (or rank)
    m = validation_metrics(two, ["t"])
    assert m["val/dice"] == pytest.approx(2 * 4 / 12) and m["val/acc_t"] == 0.5
    assert m["val/loss"] == 3.0 and m["val/loss_seg"] == 2.0 and m["val/loss_tasks"] == 1.0
    no_labels = validation_sums(out, target, {"t": torch.tensor([-1, -1, -1])}, terms, ["t"])
    assert math.isnan(validation_metrics(no_labels, ["t"])["val/acc_t"])


def test_progress_line_names_each_task():
    line = progress_line({"epoch": 1, "step": 20, "lr": 0.1, "train/loss": 0.5, "train/loss_seg": 0.4,
                          "val/dice": 0.7, "val/acc_tumor_type": 0.9, "samples_per_s": 4.0, "data_wait_share": 0.0})
    assert "acc tumor_type 0.90" in line and "val dice 0.700" in line
