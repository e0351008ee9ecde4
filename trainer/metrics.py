"""Rank 0's metric sinks: JSONL (one record per epoch) + TensorBoard, and a progress line."""

from __future__ import annotations

import json
import math
from pathlib import Path


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
        accs = [f"{k[8:]} {v:.2f}" for k, v in m.items() if k.startswith("val/acc_")]
        parts.append("acc " + " ".join(accs))
    parts.append(f"{m['samples_per_s']:.1f} samples/s, data wait {100 * m['data_wait_share']:.0f} %")
    return " | ".join(parts)
