"""Metrics of a training run: held-out sums and scores (pure), and rank 0's sinks (JSONL one
record per epoch, TensorBoard, a progress line)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch


def validation_sums(out: Mapping, seg: torch.Tensor, labels: Mapping[str, torch.Tensor], terms: Mapping,
                    tasks: Sequence[str]) -> dict[str, float]:
    """One held-out batch -> named sums (added over batches and ranks, then `validation_metrics`).

    out: the network's output; seg: (B, D, H, W) target; labels: {task: (N,) class or -1};
    terms: multitask_loss(out, seg, labels)."""
    pred = out["seg"].argmax(1)
    sums = {"batches": 1.0, "loss": float(terms["total"]), "loss_seg": float(terms["seg"]),
            "loss_tasks": sum(float(terms[f"task/{t}"]) for t in tasks),
            "dice_intersection": float(((pred == 1) & (seg == 1)).sum()),
            "dice_volumes": float((pred == 1).sum() + (seg == 1).sum())}
    for t in tasks:
        known = labels[t] >= 0
        sums[f"correct/{t}"] = float((out["tasks"][t].argmax(1)[known] == labels[t][known]).sum())
        sums[f"known/{t}"] = float(known.sum())
    return sums


def add_sums(a: dict[str, float], b: Mapping[str, float]) -> dict[str, float]:
    return {k: a.get(k, 0.0) + b.get(k, 0.0) for k in a.keys() | b.keys()}


def validation_metrics(sums: Mapping[str, float], tasks: Sequence[str]) -> dict[str, float]:
    """Summed held-out sums -> mean losses per batch, segmentation Dice (over all voxels) and
    accuracy per task (over the tumors that have a label; NaN when none has)."""
    n = max(sums.get("batches", 0.0), 1.0)
    res = {"val/loss_seg": sums["loss_seg"] / n, "val/loss_tasks": sums["loss_tasks"] / n, "val/loss": sums["loss"] / n,
           "val/dice": 2 * sums["dice_intersection"] / sums["dice_volumes"] if sums["dice_volumes"] else math.nan}
    for t in tasks:
        known = sums[f"known/{t}"]
        res[f"val/acc_{t}"] = sums[f"correct/{t}"] / known if known else math.nan
    return res


class MetricsWriter:
    def __init__(self, run_dir: Path, *, resume_step: int = 0):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = self.run_dir / "metrics.jsonl"
        if self.jsonl.exists():  # a resumed run drops records past its checkpoint
            keep = [line for line in self.jsonl.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= resume_step]
            self.jsonl.write_text("".join(line + "\n" for line in keep))
        try:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(str(self.run_dir / "tensorboard"))
        except ImportError:  # TensorBoard is optional; JSONL is always written
            self.tb = None

    def write(self, metrics: dict) -> None:
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(metrics) + "\n")
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, int | float) and k not in ("step", "epoch") and math.isfinite(v):
                    self.tb.add_scalar(k, v, metrics["step"])
            self.tb.flush()
        print(progress_line(metrics), flush=True)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def progress_line(m: dict) -> str:
    parts = [f"epoch {m['epoch']:3d}", f"step {m['step']:6d}", f"lr {m['lr']:.2g}", f"loss {m['train/loss']:.4f}",
             f"seg {m['train/loss_seg']:.4f}"]
    if "val/dice" in m:
        parts.append(f"val dice {m['val/dice']:.3f}")
        accs = [f"{k.removeprefix('val/acc_')} {v:.2f}" for k, v in m.items() if k.startswith("val/acc_")]
        parts.append("acc " + " ".join(accs))
    parts.append(f"{m['samples_per_s']:.1f} samples/s, data wait {100 * m['data_wait_share']:.0f} %")
    return " | ".join(parts)
