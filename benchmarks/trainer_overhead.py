"""Ray Train + DeepSpeed (1 worker) versus a bare single-process PyTorch loop, same model, batch and data.

    .venv/bin/python benchmarks/trainer_overhead.py [--config configs/demo.yaml] [--steps 60] \
        [--threads all,1] [--patch 48]

Both train the config's model on the same synthetic cohort, the same patch stream (trainer.data,
same seeds) and the same number of threads, with the tuned allocator. Printed, measured in this run:
steps/s and samples/s of each (median and best of several blocks: Ray workers on a 2-vCPU machine
vary by +-20 % from run to run), their ratio (goal: the trainer at most 1.10x slower), the trainer's
data-wait share of step time (goal <= 10 %) and its peak RSS. Timing excludes the first epoch
(warm-up, cache build) for both.

Two settings by default: every CPU of the machine used by the training threads (on a 2-vCPU machine
Ray's own dozen processes and service threads then preempt training), and 1 thread, which leaves
the rest of the machine to Ray, as a Ray node is normally sized.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from tumornet.config import load_config
from tumornet.runtime import tune_cpu_allocator
from tumornet.synth.phantom import generate_cohort


def bare_loop(cfg, manifest: str, warmup: int, steps: int, blocks: int) -> list[float]:
    """samples/s of `blocks` consecutive timed blocks of `steps` steps, after `warmup` steps."""
    from trainer.data import PatchStream
    from trainer.loop import split_scans
    from tumornet.cache import prepare_scan
    from tumornet.loss import multitask_loss
    from tumornet.network import MultitaskNet

    scans, train_ids, _ = split_scans(cfg, manifest)
    cached = [prepare_scan(scans[s], spacing_mm=cfg.data.spacing_mm, cache_dir=cfg.train.cache_dir) for s in train_ids]
    torch.manual_seed(cfg.train.seed)
    model = MultitaskNet(cfg.model, cfg.tasks)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.train.lr, momentum=0.9, nesterov=True)
    stream = PatchStream(cached, cfg.train, cfg.tasks.names, rank=0, start_step=0, end_step=warmup + steps * blocks)
    rates, t_start = [], None
    for i in range(warmup + steps * blocks):
        if i >= warmup and (i - warmup) % steps == 0:
            if t_start is not None:
                rates.append(steps * cfg.train.batch_size / (time.perf_counter() - t_start))
            t_start = time.perf_counter()
        _, b, _ = stream.next()
        x, seg, boxes = torch.from_numpy(b["image"]), torch.from_numpy(b["seg"]), torch.from_numpy(b["boxes"])
        labels = {k: torch.from_numpy(v) for k, v in b["labels"].items()}
        opt.zero_grad(set_to_none=True)
        multitask_loss(model(x, boxes, torch.from_numpy(b["frame"])), seg, labels, cfg.loss)["total"].backward()
        opt.step()
    rates.append(steps * cfg.train.batch_size / (time.perf_counter() - t_start))
    stream.close()
    return rates


def compare(args, threads: int, tmp: str, manifest: str | None) -> tuple[dict, str]:
    """One bare-vs-trainer comparison with `threads` threads on each side; returns its figures."""
    torch.set_num_threads(threads)
    cfg = load_config(args.config, [
        f"name=bench{threads}", f"phantom.patients={args.patients}", f"train.patch_size={args.patch}",
        f"train.epochs={1 + args.blocks}",
        f"train.batches_per_epoch={args.steps}",
        "train.val_every=1000", "train.checkpoint_every=1000", f"train.cache_dir={tmp}/cache",
        "distributed.workers=1", f"distributed.cpus_per_worker={threads}",
        f"distributed.storage_path={tmp}/runs", "distributed.zero_stage=0"])
    if manifest is None:
        manifest = str(generate_cohort(cfg.phantom, Path(tmp) / "cohort", log=lambda *_: None))
    before = bare_loop(cfg, manifest, warmup=args.steps, steps=args.steps, blocks=args.blocks)
    import ray

    from trainer.launch import run_training

    summary = run_training(cfg, manifest=manifest)
    recs = [json.loads(x) for x in (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    timed = recs[1:]  # epochs after the first (warm-up, cache build)
    ray.shutdown()
    after = bare_loop(cfg, manifest, warmup=args.steps, steps=args.steps, blocks=args.blocks)
    # the bare loop runs before and after the trainer (slow drifts of the machine cancel); each side
    # is summarized by its median and its best block (blocks of `steps` steps)
    bare_rates = before + after
    ours_rates = [r["samples_per_s"] for r in timed]
    bare = {"median": statistics.median(bare_rates), "best": max(bare_rates)}
    ours = {"median": statistics.median(ours_rates), "best": max(ours_rates)}
    b = cfg.train.batch_size
    print(f"\n{threads} thread(s) on each side, {os.cpu_count()} CPUs in the machine; config {args.config}: "
          f"C = {cfg.model.channels}, {cfg.train.patch_size}^3 patches, batch {b}, blocks of {args.steps} steps")
    for name, r in (("bare PyTorch loop", bare), ("Ray Train + DeepSpeed", ours)):
        print(f"{name:22s} : median {r['median'] / b:.2f} steps/s = {r['median']:.2f} samples/s; "
              f"best block {r['best'] / b:.2f} steps/s = {r['best']:.2f} samples/s")
    print(f"blocks (samples/s)     : bare {[round(x, 2) for x in bare_rates]}, "
          f"trainer {[round(x, 2) for x in ours_rates]}")
    print(f"trainer / bare time    : median {bare['median'] / ours['median']:.3f}x, "
          f"best {bare['best'] / ours['best']:.3f}x (goal <= 1.10)")
    print(f"data-wait share        : {100 * max(r['data_wait_share'] for r in timed):.1f} % of step time at most "
          f"(goal <= 10 %)")
    print(f"peak RSS of the worker : {timed[-1]['peak_rss_gib']:.2f} GiB; torch threads in the worker: "
          f"{timed[-1]['torch_threads']}; MALLOC_ARENA_MAX in the worker: {timed[-1]['malloc_arena_max']}")
    return {"threads": threads, "ratio_median": bare["median"] / ours["median"]}, manifest


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("--steps", type=int, default=60, help="steps per timed block (and per trainer epoch)")
    p.add_argument("--blocks", type=int, default=3, help="timed blocks per side (bare: before and after)")
    p.add_argument("--threads", default="all,1",
                   help="comma-separated thread counts to compare at ('all' = every CPU of the machine)")
    p.add_argument("--patients", type=int, default=16)
    p.add_argument("--patch", type=int, default=48, help="patch size (the demo's 64 makes the run 2.4x longer)")
    args = p.parse_args()
    tune_cpu_allocator()
    counts = [os.cpu_count() if t.strip() == "all" else int(t) for t in args.threads.split(",")]
    rows, manifest = [], None
    with tempfile.TemporaryDirectory() as tmp:
        for n in counts:
            row, manifest = compare(args, n, tmp, manifest)
            rows.append(row)
    print("\nsummary: " + "; ".join(f"{r['threads']} thread(s): {r['ratio_median']:.3f}x" for r in rows))


if __name__ == "__main__":
    main()
