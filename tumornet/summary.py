"""A cohort at a glance: counts, label distributions, missing labels, split sizes, tumor sizes.

Never prints patient identifiers: only counts and statistics.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from .labels import MISSING
from .manifest import Cohort
from .scans import read_instances
from .split import patient_groups, split_patients
from .tumors import measure_tumors


def tumor_sizes(cohort: Cohort) -> dict[str, list[float]]:
    """Tumor type -> equivalent-sphere diameters (mm) measured from the masks."""
    out: dict[str, list[float]] = {}
    task = cohort.schema["tumor_type"] if "tumor_type" in cohort.schema else None
    for rows in cohort.scans().values():
        mask, affine = read_instances(rows[0])
        tumors = measure_tumors(mask, affine, scan_id=rows[0].scan_id, tumor_ids=[r.tumor_id for r in rows],
                                where=str(rows[0].mask))
        for r, t in zip(rows, tumors, strict=True):
            label = r.labels.get("tumor_type", MISSING)
            name = task.name_of(label) if task is not None and label != MISSING else "unlabelled"
            out.setdefault(name, []).append(t.size_mm)
    return out


def summarize(cohort: Cohort, *, test_fraction: float = 0.2, seed: int = 0, measure: bool = True) -> dict:
    train, test = split_patients(patient_groups(cohort), test_fraction=test_fraction, seed=seed)
    scans = cohort.scans()
    labels: dict[str, dict[str, int]] = {}
    for task in cohort.schema.tasks:
        c = Counter(task.name_of(r.labels[task.name]) or "(missing)" for r in cohort.rows)
        labels[task.name] = {k: c[k] for k in [*task.classes, "(missing)"] if c[k]}
    n_cells = len(cohort.rows) * len(cohort.schema.tasks)
    missing = sum(1 for r in cohort.rows for v in r.labels.values() if v == MISSING)
    out = {
        "patients": len(cohort.patients()),
        "scans": len(scans),
        "tumors": len(cohort.rows),
        "tumors_per_scan_max": max(len(v) for v in scans.values()),
        "split": {"train_patients": len(train), "test_patients": len(test),
                  "test_fraction": test_fraction, "seed": seed},
        "labels": labels,
        "missing_label_fraction": round(missing / n_cells, 4),
        # case information (info_* columns): how many tumors have each, never the values
        "info": dict(sorted(Counter(c for r in cohort.rows for c in r.info).items())),
    }
    if measure:
        out["size_mm"] = {
            k: {"n": len(v), "min": round(min(v), 1), "median": round(float(np.median(v)), 1), "max": round(max(v), 1)}
            for k, v in sorted(tumor_sizes(cohort).items())
        }
    return out


def format_summary(s: dict) -> str:
    lines = [
        f"cohort: {s['patients']} patients, {s['scans']} scans, {s['tumors']} tumors "
        f"(up to {s['tumors_per_scan_max']} per scan)",
        f"split: {s['split']['train_patients']} train / {s['split']['test_patients']} test patients "
        f"(seed {s['split']['seed']})",
        f"missing labels: {100 * s['missing_label_fraction']:.1f} % of label cells",
    ]
    for task, counts in s["labels"].items():
        lines.append(f"  {task:12s} " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    if s.get("info"):
        lines.append("case information: " + ", ".join(f"{c} {n} of {s['tumors']} tumors" for c, n in s["info"].items()))
    for kind, st in s.get("size_mm", {}).items():
        lines.append(
            f"  size {kind:12s} n={st['n']:4d}  {st['min']:5.1f} .. {st['median']:5.1f} .. {st['max']:5.1f} mm"
        )
    return "\n".join(lines)
