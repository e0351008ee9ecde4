"""Embedding throughput, measured in one run on the same files and model:

1. a plain serial loop in this process (embedder.embed.embed_scan per scan, one thread: the
   baseline), its per-scan time split into NIfTI decode + resample (read_scan) and the network
   (embed_read), each measured alone, and of the latter the registration onto the template
   (tumornet.register, where the recipe reads the template frame);
2. the Ray Data job (`ray_job.py embed`: `--workers` actors of one thread on CPU; with
   `--gpus-per-worker`, CPU read tasks feeding GPU actors) into a fresh folder.

Prints tumors/s of both and their ratio (goal on 2 CPU cores: >= 1.7x), and the job's time per
scan per worker against decode + forward measured alone (goal: <= 1.3x: the job adds little of
its own). With a GPU, also the GPU's mean utilisation while the job runs (nvidia-smi).

    .venv/bin/python benchmarks/embed_speed.py --model M --manifest X --secret-file K [--scans 40]
"""

from __future__ import annotations

import argparse
import csv
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import torch

import embedder.embed
from embedder.embed import embed_read, embed_settings, read_scan
from embedder.job import run_embedding
from tumornet.export import load_model
from tumornet.keys import read_secret
from tumornet.manifest import read_manifest_lenient


def gpu_utilisation(stop: threading.Event, samples: list[float]) -> None:
    while not stop.wait(0.5):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=5).stdout
            samples.append(float(out.split()[0]))
        except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
            return


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for a in ("--model", "--manifest", "--secret-file"):
        p.add_argument(a, required=True)
    p.add_argument("--scans", type=int, default=40, help="the first N scans of the manifest")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--gpus-per-worker", type=float, default=0.0)
    p.add_argument("--precision", default="fp32")
    args = p.parse_args()
    secret = read_secret(args.secret_file)
    model, meta = load_model(args.model)
    spacing, patch, recipe = embed_settings(meta, args.model)
    cohort, _ = read_manifest_lenient(args.manifest, model.schema)
    scans = dict(list(cohort.scans().items())[: args.scans])
    work = Path(tempfile.mkdtemp(prefix="embed-speed-"))
    # the same scans for the job: their rows, in a manifest beside the original (paths stay inside its folder)
    manifest = Path(args.manifest).resolve().parent / f".embed-speed-{work.name}.csv"
    with open(args.manifest, newline="") as f:
        reader = csv.DictReader(f)
        rows = [r for r in reader if r["scan_id"] in scans]
        with open(manifest, "w", newline="") as g:
            w = csv.DictWriter(g, fieldnames=reader.fieldnames)
            w.writeheader()
            w.writerows(rows)
    try:
        measure(args, model, meta, scans, manifest, work, secret, spacing, patch, recipe)
    finally:
        manifest.unlink(missing_ok=True)
        shutil.rmtree(work, ignore_errors=True)


def measure(args, model, meta, scans, manifest, work, secret, spacing, patch, recipe) -> None:
    torch.set_num_threads(1)
    t_read = t_net = 0.0
    tumors = 0
    t_reg = [0.0]
    register = embedder.embed.register

    def timed_register(*a, **kw):
        t = time.perf_counter()
        try:
            return register(*a, **kw)
        finally:
            t_reg[0] += time.perf_counter() - t

    embedder.embed.register = timed_register  # this process only: the job's actors run the plain one
    for rs in scans.values():
        t0 = time.perf_counter()
        read = read_scan(rs, spacing_mm=spacing)
        t1 = time.perf_counter()
        tumors += len(embed_read(model, meta["model_id"], rs, read, spacing_mm=spacing, patch_size=patch,
                                 secret=secret, recipe=recipe))
        t_read, t_net = t_read + t1 - t0, t_net + time.perf_counter() - t1
    embedder.embed.register = register
    serial = t_read + t_net

    out = work / "emb"
    samples: list[float] = []
    stop = threading.Event()
    watcher = threading.Thread(target=gpu_utilisation, args=(stop, samples), daemon=True)
    if args.gpus_per_worker > 0:
        watcher.start()
    t0 = time.perf_counter()
    report = run_embedding(manifest=manifest, model_path=args.model, out_dir=out, secret_file=args.secret_file,
                           workers=args.workers, gpus_per_worker=args.gpus_per_worker, precision=args.precision,
                           log=lambda *_: None)
    job = time.perf_counter() - t0
    stop.set()
    n = len(scans)
    print(f"{n} scans, {tumors} tumors, model {meta['model_id']} (C = {model.cfg.channels}), {spacing} mm")
    print(f"serial loop: {serial:.1f} s = read {t_read:.1f} s + network {t_net:.1f} s (of which registration "
          f"{t_reg[0]:.1f} s, {t_reg[0] / n:.2f} s a scan); {tumors / serial:.2f} tumors/s")
    print(f"Ray Data job ({args.workers} workers, {args.gpus_per_worker} GPU each): {job:.1f} s (Ray start "
          f"included); {report['tumors_embedded'] / job:.2f} tumors/s")
    print(f"speed-up, job vs serial loop: {serial / job:.2f}x (goal >= 1.7x on 2 CPU cores)")
    per_scan = job * args.workers / n
    print(f"job time per scan per worker {per_scan:.2f} s vs decode + forward alone {serial / n:.2f} s: "
          f"{per_scan / (serial / n):.2f}x (goal <= 1.3x)")
    if samples:
        print(f"GPU utilisation while the job ran: mean {sum(samples) / len(samples):.0f} % ({len(samples)} samples)")


if __name__ == "__main__":
    main()
