"""Network cost on this machine: parameters, FLOPs, achieved GFLOP/s of a training step as a
fraction of a large fp32 matmul measured in the same run, and the peak memory of a step, for the
model sections of configs/demo.yaml ("demo") and configs/paper.yaml ("default", C = 64).

    .venv/bin/python benchmarks/network_speed.py [--sizes 64,120] [--configs demo,default] [--steps 3]

Each (config, patch size) runs in a fresh subprocess so that its peak RSS is its own. FLOPs are
counted with torch.utils.flop_counter (convolutions, matmuls; elementwise ops are not counted).
fp32 on CPU (see STACK_NOTES: bf16 is hundreds of times slower on these CPUs).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = {"demo": ROOT / "configs" / "demo.yaml", "default": ROOT / "configs" / "paper.yaml"}


def matmul_gflops(n: int = 2048, reps: int = 10) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times) / 1e9


def measure(config: str, size: int, steps: int, tuned: bool = True) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    from tumornet.runtime import tune_cpu_allocator

    if tuned:
        tune_cpu_allocator()

    from tumornet.config import load_config
    from tumornet.labels import DEFAULT_SCHEMA
    from tumornet.loss import LossWeights, multitask_loss
    from tumornet.network import MultitaskNet

    torch.manual_seed(0)
    model_cfg = load_config(CONFIGS[config]).model
    net = MultitaskNet(model_cfg, DEFAULT_SCHEMA)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    x = torch.randn(2, 1, size, size, size)
    seg = torch.zeros(2, size, size, size, dtype=torch.long)
    seg[:, size // 3: size // 2, size // 3: size // 2, size // 3: size // 2] = 1
    lo, hi = size // 3, size // 2
    boxes = torch.tensor([[0, lo, lo, lo, hi, hi, hi], [1, lo, lo, lo, hi, hi, hi]])
    labels = {t: torch.tensor([0, 1]) for t in DEFAULT_SCHEMA.names}

    def step():
        opt.zero_grad(set_to_none=True)
        multitask_loss(net(x, boxes), seg, labels, LossWeights())["total"].backward()
        opt.step()

    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        net(x, boxes)
    fwd = fc.get_total_flops()
    with FlopCounterMode(display=False) as fc:
        step()
    train = fc.get_total_flops()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    mm = matmul_gflops()
    dt = statistics.median(times)
    return {
        "config": config, "allocator": "tuned" if tuned else "glibc default", "channels": model_cfg.channels,
        "patch": size, "batch": 2,
        "params": sum(p.numel() for p in net.parameters()),
        "gflop_forward": fwd / 1e9, "gflop_train_step": train / 1e9, "step_s": dt,
        "train_gflops": train / dt / 1e9, "matmul_gflops": mm, "fraction_of_matmul": train / dt / 1e9 / mm,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "rss_before_steps_gib": rss_before / 2**20,
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", default="64,120")
    p.add_argument("--configs", default="demo,default")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--one", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(measure(args.one[0], int(args.one[1]), args.steps, args.one[2] == "tuned")))
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32")
    print(f"{'config':8s} {'C':>3s} {'patch':>5s} {'params':>9s} {'GF fwd':>8s} {'GF step':>8s} {'step s':>7s} "
          f"{'GF/s':>6s} {'matmul':>6s} {'ratio':>6s} {'peak RSS':>9s}  {'untuned step s':>14s}")
    for config in args.configs.split(","):
        for size in args.sizes.split(","):
            m, u = (_run(config, size, args.steps, mode) for mode in ("tuned", "untuned"))
            print(f"{m['config']:8s} {m['channels']:3d} {m['patch']:4d}^3 {m['params']:9d} {m['gflop_forward']:8.1f} "
                  f"{m['gflop_train_step']:8.1f} {m['step_s']:7.2f} {m['train_gflops']:6.1f} {m['matmul_gflops']:6.1f} "
                  f"{m['fraction_of_matmul']:6.2f} {m['peak_rss_gib']:7.2f} GiB  {u['step_s']:7.2f} "
                  f"(x{u['step_s'] / m['step_s']:.2f})")
    print("ratio = training-step GFLOP/s / fp32 2048^3 matmul GFLOP/s, both measured here; goal >= 0.60. "
          "untuned = glibc's default allocator (tumornet.runtime.tune_cpu_allocator not applied).")


def _run(config: str, size: str, steps: int, mode: str) -> dict:
    r = subprocess.run([sys.executable, __file__, "--one", config, size, mode, "--steps", str(steps)],
                       capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
