"""The paper's multitask loss.

    loss = lambda_s * CE(segmentation) + sum_p lambda_p * sum_t CE(task p, tumor t)
           [+ lambda_d * (1 - soft Dice of the tumor classes over the batch)]   (ours, off by default)

Segmentation CE is averaged over voxels; task terms are summed over tumors (as in the paper).
Every task, binary or multiclass, is a softmax over its classes. A label of -1 (missing)
contributes no term and no gradient; a task whose labels are all missing contributes 0.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .errors import InputError
from .labels import MISSING


@dataclass(frozen=True, kw_only=True)
class LossWeights:
    seg: float = 1.0  # lambda_s
    task: float = 1e-3  # lambda_p, every task
    per_task: Mapping[str, float] = field(default_factory=dict)  # overrides of lambda_p by task name
    # lambda_d: a soft Dice term on the segmentation (not in the paper; 0 = off). Tumors are 0.1-1 % of a
    # patch: CE averaged over voxels lets small tumors go unsegmented, which the detection of scans
    # without a mask pays for; Dice counts every tumor voxel as much as the whole background does
    seg_dice: float = 0.0

    def __post_init__(self) -> None:
        weights = {"seg": self.seg, "task": self.task, "seg_dice": self.seg_dice,
                   **{f"per_task.{k}": v for k, v in self.per_task.items()}}
        for key, v in weights.items():
            if v < 0:
                raise InputError(f"loss.{key}: must be >= 0, got {v}")

    def of(self, task: str) -> float:
        return float(self.per_task.get(task, self.task))


def as_float32(out: dict) -> dict:
    """Network outputs in fp32 (bf16 / fp16 runs compute the loss in fp32)."""
    return {"seg": out["seg"].float(), "embedding": out["embedding"].float(),
            "tasks": {k: v.float() for k, v in out["tasks"].items()}}


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """1 - soft Dice of "any tumor class" over the whole batch: logits (B, n_seg, D, H, W), target
    (B, D, H, W) class indices (0 = background). eps smooths a batch without tumor (-> about 0)."""
    p = 1.0 - torch.softmax(logits.float(), dim=1)[:, 0]
    t = (target > 0).float()
    return 1.0 - (2.0 * (p * t).sum() + eps) / (p.sum() + t.sum() + eps)


def multitask_loss(out: dict, seg_target: torch.Tensor, labels: Mapping[str, torch.Tensor],
                   weights: LossWeights = LossWeights()) -> dict[str, torch.Tensor]:
    """-> {"seg": ..., "task/<name>": ... (unweighted), "total": weighted sum}.

    seg_target: (B, D, H, W) class indices; labels: {task: (N,) class index or -1}.
    """
    seg = F.cross_entropy(out["seg"], seg_target.long())
    terms: dict[str, torch.Tensor] = {"seg": seg}
    total = weights.seg * seg
    if weights.seg_dice > 0:
        terms["seg_dice"] = soft_dice_loss(out["seg"], seg_target)
        total = total + weights.seg_dice * terms["seg_dice"]
    for name, logits in out["tasks"].items():
        y = labels.get(name)
        if y is None:
            y = torch.full((logits.shape[0],), MISSING, dtype=torch.long, device=logits.device)
        ce = F.cross_entropy(logits, y.long().to(logits.device), ignore_index=MISSING, reduction="sum")
        terms[f"task/{name}"] = ce
        total = total + weights.of(name) * ce
    terms["total"] = total
    return terms
