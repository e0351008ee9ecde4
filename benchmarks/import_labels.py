"""What the import's location labels are worth: the procedure of `ray_job.py import` (the scan registered
onto the template with its labelled regions left out of the similarity, then anatomy.describe of each
tumor's voxels in template mm; tumornet.layouts.case_rows) run on phantom scans, whose true labels the
generator wrote in the manifest, once per registration setting: the share of tumors whose area and
halves it reads as the truth, and the seconds a registration takes.

    .venv/bin/python benchmarks/import_labels.py --manifest data/varied/manifest.csv [--scans 60] [--warps 0,24]

The phantom's scans have a skull (as the VS layout's), so the registration reads the template's T1 with
skull. A tumor whose type the manifest leaves blank is scored on its halves only (its area rule needs
the type, as the importers know it from the dataset).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from tumornet.anatomy import EXTRA_AXIAL_TYPES, load_anatomy
from tumornet.boxes import box_from_mask
from tumornet.manifest import read_manifest
from tumornet.register import check_warp_mm, register
from tumornet.tumors import instances_from_binary
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
    anat = load_anatomy(None)
    hits = {w: {t: [] for t in TASKS} for w in warps}
    secs = dict.fromkeys(warps, 0.0)
    scans = list(cohort.scans().values())[:args.scans]
    for scan in scans:
        data, affine = read_nifti(scan[0].image)
        inst, _ = read_label_map(scan[0].mask, like=(data, affine, scan[0].image))
        labelled = instances_from_binary(inst > 0)
        boxes = [box_from_mask(labelled == k) for k in range(1, int(labelled.max()) + 1)]
        for w in warps:
            t0 = time.perf_counter()
            frame = register(data, affine, skull_stripped=False, warp_mm=w, ignore=boxes)
            secs[w] += time.perf_counter() - t0
            for row in scan:
                known = row.labels["tumor_type"] >= 0
                kind = cohort.schema["tumor_type"].classes[row.labels["tumor_type"]] if known else None
                loc = anat.describe(frame.template_mm(np.argwhere(inst == row.tumor_id)),
                                    extra_axial=EXTRA_AXIAL_TYPES[kind] if kind else None)
                for t in TASKS:
                    if row.labels[t] >= 0 and (t != "area" or kind):
                        hits[w][t].append(cohort.schema[t].classes[row.labels[t]] == loc[t])
    print(f"{args.manifest}: {len(scans)} scans; labels read as the truth (tumors scored)")
    print("| warp_mm | " + " | ".join(TASKS) + " | seconds a registration |")
    print("|---|" + "---|" * (len(TASKS) + 1))
    for w in warps:
        print(f"| {w:g} | " + " | ".join(f"{np.mean(h):.3f} ({len(h)})" for h in hits[w].values())
              + f" | {secs[w] / len(scans):.1f} |")


if __name__ == "__main__":
    main()
