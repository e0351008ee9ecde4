"""The paper's multitask loss.

    loss = lambda_s * CE(segmentation) + sum_p lambda_p * sum_t CE(task p, tumor t)
           [+ lambda_d * (1 - soft Dice of the tumor classes over the batch)]   (ours, off by default)
           [+ lambda_t * mean over tumors of (1 - soft Dice in the tumor's box)] (ours, off by default)
           [+ lambda_m * supervised contrastive loss of the RoiPool vectors]  (ours, off by default)

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
    # lambda_t: a soft Dice term per tumor, each inside its own box, averaged over the batch's tumors (not in
    # the paper; 0 = off): the batch Dice weighs a tumor by its voxels, so a small tumor the network misses
    # costs little; here every tumor counts the same (twenty-eighth session: a lead for small metastases)
    seg_dice_per_tumor: float = 0.0
    # the segmentation CE's weight of tumor voxels against background ones (1 = the paper's plain CE; above 1
    # a missed tumor voxel costs more: a lead for faint small tumors the detection misses, twentieth round)
    seg_tumor_weight: float = 1.0
    # lambda_m: a supervised contrastive term on the RoiPool vectors (not in the paper; 0 = off): tumors
    # that share a task's label are pulled together, against the batch's other tumors and the last
    # `metric_memory` tumors of this worker (a batch of 2 patches holds too few tumors to contrast)
    metric: float = 0.0
    metric_temperature: float = 0.1
    metric_memory: int = 512

    def __post_init__(self) -> None:
        weights = {"seg": self.seg, "task": self.task, "seg_dice": self.seg_dice, "metric": self.metric,
                   "seg_dice_per_tumor": self.seg_dice_per_tumor,
                   "metric_memory": self.metric_memory, **{f"per_task.{k}": v for k, v in self.per_task.items()}}
        for key, v in weights.items():
            if v < 0:
                raise InputError(f"loss.{key}: must be >= 0, got {v}")
        if not self.seg_tumor_weight > 0:
            raise InputError(f"loss.seg_tumor_weight: must be > 0, got {self.seg_tumor_weight}")
        if not self.metric_temperature > 0:
            raise InputError(f"loss.metric_temperature: must be > 0, got {self.metric_temperature}")
        if int(self.metric_memory) != self.metric_memory:
            raise InputError(f"loss.metric_memory: must be a whole number of tumors, got {self.metric_memory}")

    def of(self, task: str) -> float:
        return float(self.per_task.get(task, self.task))


def as_float32(out: dict) -> dict:
    """Network outputs in fp32 (bf16 / fp16 runs compute the loss in fp32)."""
    return {"seg": out["seg"].float(), "embedding": out["embedding"].float(),
            "tasks": {k: v.float() for k, v in out["tasks"].items()}}


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """1 - soft Dice of "any tumor class" over the whole batch: logits (B, n_seg, D, H, W), target
    (B, D, H, W) class indices (0 = background). eps smooths a batch without tumor (-> about 0)."""
    return _dice_loss(*_tumor_maps(logits, target), eps)


def _tumor_maps(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(P(any tumor class), the target's tumor voxels as 0 / 1), both (B, D, H, W)."""
    return 1.0 - torch.softmax(logits.float(), dim=1)[:, 0], (target > 0).float()


def _dice_loss(p: torch.Tensor, t: torch.Tensor, eps: float) -> torch.Tensor:
    return 1.0 - (2.0 * (p * t).sum() + eps) / (p.sum() + t.sum() + eps)


def per_tumor_dice_loss(logits: torch.Tensor, target: torch.Tensor, boxes: torch.Tensor,
                        eps: float = 1.0) -> torch.Tensor:
    """Mean over the tumors of 1 - soft Dice of "any tumor class" inside each tumor's box: logits (B, n_seg,
    D, H, W), target (B, D, H, W) class indices, boxes (N, 7) (batch index, lo xyz, hi xyz; voxels, half-open,
    clipped to the patch). Every tumor counts the same whatever its size; no tumor gives 0 (with a gradient
    path)."""
    p, t = _tumor_maps(logits, target)
    size = p.shape[1:]
    per = []
    for row in boxes.tolist():
        b, lo = int(row[0]), [max(0, int(v)) for v in row[1:4]]
        hi = [min(n, int(v)) for v, n in zip(row[4:7], size, strict=True)]
        if any(h <= low for low, h in zip(lo, hi, strict=True)):
            continue
        box = (b, slice(lo[0], hi[0]), slice(lo[1], hi[1]), slice(lo[2], hi[2]))
        per.append(_dice_loss(p[box], t[box], eps))
    return torch.stack(per).mean() if per else p.sum() * 0.0


class EmbeddingBank:
    """The last `size` tumors' L2-normalized RoiPool vectors and labels (detached): the contrast set of
    the metric term beyond the batch (a cross-batch memory, Wang et al. 2020). Per worker, in memory
    only: a resumed run starts it empty."""

    def __init__(self, size: int):
        self.size = int(size)
        self.emb: torch.Tensor | None = None
        self.labels: dict[str, torch.Tensor] = {}

    def __len__(self) -> int:
        return 0 if self.emb is None else len(self.emb)

    def push(self, emb: torch.Tensor, labels: Mapping[str, torch.Tensor]) -> None:
        z = F.normalize(emb.detach().float(), dim=1)
        old = z[:0] if self.emb is None else self.emb
        keep = max(0, len(old) + len(z) - self.size)  # first in, first out; size 0 keeps nothing
        for k in self.labels.keys() | labels.keys():  # a task absent from one side: missing there
            self.labels[k] = torch.cat([self.task_labels(k, len(old), z.device),
                                        labels[k].detach().long().to(z.device) if k in labels else
                                        torch.full((len(z),), MISSING, dtype=torch.long, device=z.device)])[keep:]
        self.emb = torch.cat([old, z])[keep:]

    def task_labels(self, task: str, n: int, device) -> torch.Tensor:
        """The remembered labels of one task (all missing for a task never pushed)."""
        got = self.labels.get(task)
        return got if got is not None else torch.full((n,), MISSING, dtype=torch.long, device=device)


def supervised_contrastive_loss(emb: torch.Tensor, labels: Mapping[str, torch.Tensor],
                                bank: EmbeddingBank | None = None, temperature: float = 0.1) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al. 2020) of the L2-normalized vectors emb (N, C), per task
    and averaged over the tasks that have an anchor: an anchor is a tumor with a known label; its
    candidates are the other tumors of the batch and those of the bank whose label of that task is
    known; its positives are the candidates sharing its label. An anchor without a positive
    contributes nothing; no anchor at all gives 0 (with a gradient path)."""
    z = F.normalize(emb.float(), dim=1)
    n = len(z)
    cand = z if bank is None or not len(bank) else torch.cat([z, bank.emb.to(z)])
    logits = z @ cand.T / temperature
    not_self = torch.ones_like(logits, dtype=torch.bool)
    not_self[:, :n] &= ~torch.eye(n, dtype=torch.bool, device=z.device)
    per_task = []
    for task, y in labels.items():
        y = y.long().to(z.device)
        yc = y if len(cand) == n else torch.cat([y, bank.task_labels(task, len(cand) - n, z.device).to(z.device)])
        valid = not_self & (yc != MISSING)[None, :]
        logp = logits.masked_fill(~valid, float("-inf"))
        logp = logp - torch.logsumexp(logp, dim=1, keepdim=True)
        pos = valid & (y[:, None] == yc[None, :]) & (y != MISSING)[:, None]
        anchors = pos.any(dim=1)
        if anchors.any():
            mean_pos = torch.where(pos, logp, torch.zeros_like(logp)).sum(1) / pos.sum(1).clamp(min=1)
            per_task.append(-mean_pos[anchors].mean())
    return torch.stack(per_task).mean() if per_task else z.sum() * 0.0


def multitask_loss(out: dict, seg_target: torch.Tensor, labels: Mapping[str, torch.Tensor],
                   weights: LossWeights = LossWeights(), bank: EmbeddingBank | None = None,
                   boxes: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """-> {"seg": ..., "task/<name>": ... (unweighted), "total": weighted sum}.

    seg_target: (B, D, H, W) class indices; labels: {task: (N,) class index or -1}; bank: the metric
    term's memory of past tumors (read, not updated here); boxes: the tumors' boxes (N, 7), needed by the
    per-tumor Dice term.
    """
    class_weight = None
    if weights.seg_tumor_weight != 1:  # background 1, every tumor class seg_tumor_weight
        class_weight = torch.full((out["seg"].shape[1],), float(weights.seg_tumor_weight), device=out["seg"].device)
        class_weight[0] = 1.0
    seg = F.cross_entropy(out["seg"], seg_target.long(), weight=class_weight)
    terms: dict[str, torch.Tensor] = {"seg": seg}
    total = weights.seg * seg
    if weights.seg_dice > 0:
        terms["seg_dice"] = soft_dice_loss(out["seg"], seg_target)
        total = total + weights.seg_dice * terms["seg_dice"]
    if weights.seg_dice_per_tumor > 0:
        if boxes is None:
            raise ValueError("loss.seg_dice_per_tumor needs the tumors' boxes")
        terms["seg_dice_per_tumor"] = per_tumor_dice_loss(out["seg"], seg_target, boxes)
        total = total + weights.seg_dice_per_tumor * terms["seg_dice_per_tumor"]
    if weights.metric > 0:
        terms["metric"] = supervised_contrastive_loss(out["embedding"], labels, bank, weights.metric_temperature)
        total = total + weights.metric * terms["metric"]
    for name, logits in out["tasks"].items():
        y = labels.get(name)
        if y is None:
            y = torch.full((logits.shape[0],), MISSING, dtype=torch.long, device=logits.device)
        ce = F.cross_entropy(logits, y.long().to(logits.device), ignore_index=MISSING, reduction="sum")
        terms[f"task/{name}"] = ce
        total = total + weights.of(name) * ce
    terms["total"] = total
    return terms
