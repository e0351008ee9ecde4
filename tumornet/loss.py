"""The paper's multitask loss.

    loss = lambda_s * CE(segmentation) + sum_p lambda_p * sum_t CE(task p, tumor t)

Segmentation CE is averaged over voxels; task terms are summed over tumors (as in the paper).
Every task, binary or multiclass, is a softmax over its classes. A label of -1 (missing)
contributes no term and no gradient; a task whose labels are all missing contributes 0.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .labels import MISSING


@dataclass(frozen=True, kw_only=True)
class LossWeights:
    seg: float = 1.0  # lambda_s
    task: float = 1e-3  # lambda_p, every task
    per_task: Mapping[str, float] = field(default_factory=dict)  # overrides of lambda_p by task name

    def of(self, task: str) -> float:
        return float(self.per_task.get(task, self.task))


def as_float32(out: dict) -> dict:
    """Network outputs in fp32 (bf16 / fp16 runs compute the loss in fp32)."""
    return {"seg": out["seg"].float(), "embedding": out["embedding"].float(),
            "tasks": {k: v.float() for k, v in out["tasks"].items()}}


def multitask_loss(out: dict, seg_target: torch.Tensor, labels: Mapping[str, torch.Tensor],
                   weights: LossWeights = LossWeights()) -> dict[str, torch.Tensor]:
    """-> {"seg": ..., "task/<name>": ... (unweighted), "total": weighted sum}.

    seg_target: (B, D, H, W) class indices; labels: {task: (N,) class index or -1}.
    """
    seg = F.cross_entropy(out["seg"], seg_target.long())
    terms: dict[str, torch.Tensor] = {"seg": seg}
    total = weights.seg * seg
    for name, logits in out["tasks"].items():
        y = labels.get(name)
        if y is None:
            y = torch.full((logits.shape[0],), MISSING, dtype=torch.long, device=logits.device)
        ce = F.cross_entropy(logits, y.long().to(logits.device), ignore_index=MISSING, reduction="sum")
        terms[f"task/{name}"] = ce
        total = total + weights.of(name) * ce
    terms["total"] = total
    return terms
