"""Detection quality of scans without a mask (`evaluate --detection`): the tumors the segmentation
head finds (tumornet.detect) against the masks of the model's held-out scans, on the working grid.

A found component matches a true tumor when their Dice is >= `min_dice` (0.3). Recall: the share of
true tumors of at least `min_size_mm` (equivalent-sphere diameter, 10 mm) that some component
matches; precision: the share of found components of at least that size that match a true tumor
(any size). Also the largest tumor: how often the largest component matches the largest true one.
"""

from __future__ import annotations

import numpy as np

from embedder.embed import detect_settings, embed_settings
from tumornet.detect import detect_tumors
from tumornet.export import load_model
from tumornet.manifest import read_manifest
from tumornet.scans import load_scan
from tumornet.split import split_of_model


def dice_matrix(truth: np.ndarray, found: np.ndarray) -> np.ndarray:
    """Two instance masks of one grid -> Dice (n_true, n_found) between every pair of ids 1..n."""
    nt, nf = int(truth.max()), int(found.max())
    both = (truth > 0) & (found > 0)
    inter = np.zeros((nt + 1, nf + 1))
    np.add.at(inter, (truth[both], found[both]), 1.0)
    vt = np.bincount(truth.ravel(), minlength=nt + 1).astype(float)
    vf = np.bincount(found.ravel(), minlength=nf + 1).astype(float)
    d = 2.0 * inter / np.maximum(vt[:, None] + vf[None, :], 1.0)
    return d[1:, 1:]


def detection_quality(model_path, manifest, *, on: str = "test", min_size_mm: float = 10.0, min_dice: float = 0.3,
                      min_volume_ml: float | None = None) -> dict:
    model, meta = load_model(model_path)
    spacing, _, _ = embed_settings(meta, model_path)
    cfg = detect_settings(meta, min_volume_ml=min_volume_ml)
    cohort = read_manifest(manifest, model.schema)
    _, scan_ids = split_of_model(cohort, meta, where=str(model_path), on=on)
    scans = cohort.scans()
    voxel_mm3 = None
    true_big = true_hit = found_big = found_hit = largest = 0
    for sid in scan_ids:
        scan = load_scan(scans[sid], spacing_mm=spacing)
        voxel_mm3 = abs(float(np.linalg.det(scan.volume.affine[:3, :3])))
        found, tumors = detect_tumors(model, scan.volume, cfg)
        d = dice_matrix(scan.instances, found)
        for t in scan.tumors:  # a tumor too thin for the working grid has no row of d: missed
            if t.size_mm >= min_size_mm:
                true_big += 1
                true_hit += bool(d.shape[1] and t.tumor_id <= d.shape[0] and d[t.tumor_id - 1].max() >= min_dice)
        for t in tumors:
            if t.size_mm >= min_size_mm:
                found_big += 1
                found_hit += bool(d.shape[0] and d[:, t.tumor_id - 1].max() >= min_dice)
        biggest = max(scan.tumors, key=lambda t: t.volume_ml).tumor_id
        largest += bool(tumors and d.shape[0] >= biggest and d[biggest - 1, 0] >= min_dice)  # found id 1: largest
    return {"model_id": meta["model_id"], "on": on, "scans": len(scan_ids), "min_size_mm": min_size_mm,
            "min_dice": min_dice, "threshold": cfg.threshold, "min_volume_ml": cfg.min_volume_ml,
            "voxel_mm3": voxel_mm3, "true_tumors": true_big, "found_tumors": found_big,
            "recall": true_hit / true_big if true_big else float("nan"),
            "precision": found_hit / found_big if found_big else float("nan"),
            "largest_matched": largest / len(scan_ids) if scan_ids else float("nan")}


def format_detection(res: dict) -> str:
    def share(v, fmt: str) -> str:  # null in a JSON read back, NaN fresh: nothing to count
        return "n/a" if v is None or v != v else format(v, fmt)

    return (f"Detection on {res['scans']} {res['on']} scans (tumors >= {res['min_size_mm']:g} mm, match: Dice >= "
            f"{res['min_dice']:g}): recall {share(res['recall'], '.2f')} of {res['true_tumors']} true tumors, "
            f"precision {share(res['precision'], '.2f')} of {res['found_tumors']} found; largest tumor found in "
            f"{share(res['largest_matched'], '.0%')} of the scans")
