"""Synthetic cohort speed: seconds per 20 patients at 2 mm, against the 60 s target.

    .venv/bin/python benchmarks/phantom_speed.py [--patients 20] [--workers 2]

Prints one line per run, measured in this run (the anatomy cache is built first and not timed).
"""

from __future__ import annotations

import argparse
import tempfile
import time

from tumornet.synth.phantom import PhantomConfig, find_sites, generate_cohort


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--patients", type=int, default=20)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--spacing", type=float, default=2.0)
    args = p.parse_args()
    find_sites()  # build / load the anatomy cache outside the timing
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        generate_cohort(PhantomConfig(patients=args.patients, voxel_mm=args.spacing, workers=args.workers), tmp,
                        log=lambda *_: None)
        dt = time.perf_counter() - t0
    per20 = dt / args.patients * 20
    print(f"phantom: {args.patients} patients at {args.spacing} mm with {args.workers} workers in {dt:.1f} s "
          f"= {per20:.1f} s per 20 patients; target 60 s -> ratio {per20 / 60:.2f} (<= 1 meets it)")


if __name__ == "__main__":
    main()
