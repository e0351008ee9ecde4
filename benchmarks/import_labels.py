"""What the import's location labels are worth: the importers' own code (tumornet.layouts.tumor_locations:
the scan registered onto the template with its labelled regions left out of the similarity, then
anatomy.describe of each tumor's voxels in template mm) run on phantom scans, whose true labels the
generator wrote in the manifest, once per registration setting: the share of tumors whose area and
halves it reads as the truth, and the seconds a scan takes.

    .venv/bin/python benchmarks/import_labels.py --manifest data/varied/manifest.csv [--scans 60] [--warps 0,24]

The phantom's scans have a skull (as the VS layout's), so the registration reads the template's T1 with
skull. A tumor whose type the manifest leaves blank is scored on its halves only (its area rule needs
the type, as the importers know it from the dataset).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from tumornet.layouts import tumor_locations
from tumornet.manifest import read_manifest
from tumornet.register import check_warp_mm
from tumornet.volumes import read_label_map, read_nifti

TASKS = ("area", "left_right", "front_rear", "upper_lower")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--manifest", required=True, help="a phantom cohort's manifest (its labels are the truth)")
    p.add_argument("--scans", type=int, default=60, help="the first N scans of the manifest")
    p.add_argument("--warps", default="0,24", help="registration settings to compare (warp_mm; 0: affine only)")
    args = p.parse_args()
    warps = [check_warp_mm(float(w), "--warps") for w in args.warps.split(",")]
    cohort = read_manifest(args.manifest)
    hits = {w: {t: [] for t in TASKS} for w in warps}
    secs = dict.fromkeys(warps, 0.0)
    scans = list(cohort.scans().values())[:args.scans]
    for scan in scans:
        data, affine = read_nifti(scan[0].image)
        inst, _ = read_label_map(scan[0].mask, like=(data, affine, scan[0].image))
        # the importers know the type from the dataset; here the manifest's (blank: None)
        types = {r.tumor_id: cohort.schema["tumor_type"].classes[r.labels["tumor_type"]]
                 if r.labels["tumor_type"] >= 0 else None for r in scan}
        for w in warps:
            t0 = time.perf_counter()
            locs = tumor_locations(data, affine, inst, inst > 0, types, warp_mm=w)
            secs[w] += time.perf_counter() - t0
            for row in scan:
                for t in TASKS:
                    if row.labels[t] >= 0 and (t != "area" or types[row.tumor_id]):
                        hits[w][t].append(cohort.schema[t].classes[row.labels[t]] == locs[row.tumor_id][t])
    print(f"{args.manifest}: {len(scans)} scans; labels read as the truth (tumors scored)")
    print("| warp_mm | " + " | ".join(TASKS) + " | seconds a scan |")
    print("|---|" + "---|" * (len(TASKS) + 1))
    for w in warps:
        print(f"| {w:g} | " + " | ".join(f"{np.mean(h):.3f} ({len(h)})" for h in hits[w].values())
              + f" | {secs[w] / len(scans):.1f} |")


if __name__ == "__main__":
    main()
