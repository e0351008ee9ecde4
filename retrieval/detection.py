"""Detection quality of scans without a mask (`evaluate --detection`): the tumors the segmentation
head finds (tumornet.detect) against the masks of the model's held-out scans, on the working grid.

A found component matches a true tumor when their Dice is >= `min_dice` (0.3). Recall: the share of
true tumors of at least `min_size_mm` (equivalent-sphere diameter, 10 mm) that some component
matches; precision: the share of found components of at least that size that match a true tumor
(any size). Also the largest tumor: how often the largest component matches the largest true one.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from embedder.embed import embed_settings, load_detector
from tumornet.detect import DetectConfig, tumor_probability, tumors_from_probability
from tumornet.errors import InputError
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


def _counts(scan, found: np.ndarray, tumors, min_size_mm: float, min_dice: float) -> np.ndarray:
    """One scan -> [true tumors >= min size, of them matched, found >= min size, of them matching,
    largest true tumor matched by the largest found]."""
    d = dice_matrix(scan.instances, found)
    c = np.zeros(5, dtype=np.int64)
    for t in scan.tumors:  # a tumor too thin for the working grid has no row of d: missed
        if t.size_mm >= min_size_mm:
            c[0] += 1
            c[1] += bool(d.shape[1] and t.tumor_id <= d.shape[0] and d[t.tumor_id - 1].max() >= min_dice)
    for t in tumors:
        if t.size_mm >= min_size_mm:
            c[2] += 1
            c[3] += bool(d.shape[0] and d[:, t.tumor_id - 1].max() >= min_dice)
    biggest = max(scan.tumors, key=lambda t: t.volume_ml).tumor_id
    c[4] += bool(tumors and d.shape[0] >= biggest and d[biggest - 1, 0] >= min_dice)  # found id 1: the largest
    return c


def parse_windows(text: str) -> list[tuple[int, float]]:
    """--detect-windows "64:0.5,96:0.25" -> [(64, 0.5), (96, 0.25)], each checked as detect.window / overlap."""
    out = []
    for item in text.split(","):
        try:
            w, o = item.split(":")
            out.append((int(w), float(o)))
        except ValueError:
            raise InputError(f"--detect-windows: expected WINDOW:OVERLAP items (e.g. 64:0.5), got {item!r}") from None
        DetectConfig(window=out[-1][0], overlap=out[-1][1])
    return out


def detection_sweep(model_path, manifest, *, on: str = "test", thresholds=None, windows=None,
                    min_size_mm: float = 10.0, min_dice: float = 0.3, min_volume_ml: float | None = None,
                    detector=None) -> list[dict]:
    """Detection quality at the model's `detect` settings and at each of `thresholds` and `windows`
    ((window, overlap) pairs of the sliding-window pass), the tumor probability computed once per scan
    and window -> one record per (window, threshold), the model's own first. Choose them on the
    validation split (`on="validation"`), then set them in the config's `detect` section. `detector`: a
    model file that finds the tumors instead of the model's own head (embed --detector), at its own
    `detect` settings; it must record the same split as the model (its held-out patients unseen)."""
    model, meta = load_model(model_path)
    spacing, _, _ = embed_settings(meta, model_path)
    cohort = read_manifest(manifest, model.schema)
    _, scan_ids = split_of_model(cohort, meta, where=str(model_path), on=on)
    net, detector_meta, cfg = load_detector(detector, meta, spacing, min_volume_ml=min_volume_ml)
    detector_id = None
    if net is not None:
        model, detector_id = net, detector_meta["model_id"]
        if split_of_model(cohort, detector_meta, where=str(detector), on=on)[1] != scan_ids:
            raise InputError(f"{detector}: the detector's {on} patients are not the model's ({model_path}): its "
                             "detection would be scored on patients it may have trained on")
    passes = [(cfg.window, cfg.overlap), *((int(w), float(o)) for w, o in windows or ())]
    passes = list(dict.fromkeys(passes))
    cfgs = [replace(cfg, window=w, overlap=o, threshold=float(t)) for w, o in passes
            for t in dict.fromkeys([cfg.threshold, *(thresholds or ())])]
    scans = cohort.scans()
    voxel_mm3 = None
    counts = np.zeros((len(cfgs), 5), dtype=np.int64)
    for sid in scan_ids:
        scan = load_scan(scans[sid], spacing_mm=spacing)
        voxel_mm3 = abs(float(np.linalg.det(scan.volume.affine[:3, :3])))
        for w, o in passes:
            prob = tumor_probability(model, scan.volume.array, window=w, overlap=o)
            for j, c in enumerate(cfgs):
                if (c.window, c.overlap) == (w, o):
                    counts[j] += _counts(scan, *tumors_from_probability(prob, scan.volume, c), min_size_mm, min_dice)
    out = []
    for c, (true_big, true_hit, found_big, found_hit, largest) in zip(cfgs, counts.tolist(), strict=True):
        out.append({"model_id": meta["model_id"], "detector_id": detector_id, "on": on, "scans": len(scan_ids),
                    "min_size_mm": min_size_mm,
                    "min_dice": min_dice, "threshold": c.threshold, "window": c.window, "overlap": c.overlap,
                    "min_volume_ml": c.min_volume_ml,
                    "voxel_mm3": voxel_mm3, "true_tumors": true_big, "found_tumors": found_big,
                    "recall": true_hit / true_big if true_big else float("nan"),
                    "precision": found_hit / found_big if found_big else float("nan"),
                    "largest_matched": largest / len(scan_ids) if scan_ids else float("nan")})
    return out


def detection_quality(model_path, manifest, *, on: str = "test", min_size_mm: float = 10.0, min_dice: float = 0.3,
                      min_volume_ml: float | None = None, detector=None) -> dict:
    """Detection quality at the model's (or the detector's) own detection settings (see detection_sweep)."""
    return detection_sweep(model_path, manifest, on=on, min_size_mm=min_size_mm, min_dice=min_dice,
                           min_volume_ml=min_volume_ml, detector=detector)[0]


def format_detection(res: dict) -> str:
    def share(v, fmt: str) -> str:  # null in a JSON read back, NaN fresh: nothing to count
        return "n/a" if v is None or v != v else format(v, fmt)

    window = f", window {res['window']} overlap {res['overlap']:g}" if "window" in res else ""
    by = f" by detector {res['detector_id']}" if res.get("detector_id") else ""
    return (f"Detection{by} on {res['scans']} {res['on']} scans at threshold {res['threshold']:g}{window} (tumors >= "
            f"{res['min_size_mm']:g} mm, match: Dice >= {res['min_dice']:g}): recall {share(res['recall'], '.2f')} "
            f"of {res['true_tumors']} true tumors, precision {share(res['precision'], '.2f')} of "
            f"{res['found_tumors']} found; largest tumor found in "
            f"{share(res['largest_matched'], '.0%')} of the scans")
