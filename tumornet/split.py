"""The patient-level split: training and held-out patients, stratified by tumor type.

Deterministic for a seed and independent of row order; every scan of a patient (follow-ups too)
falls on the same side, so a held-out tumor is never searched among its own patient's scans.
"""

from __future__ import annotations

import secrets
from collections import defaultdict

import numpy as np

from .errors import InputError
from .keys import keyed_id
from .labels import MISSING
from .manifest import Cohort


def patient_groups(cohort: Cohort, task: str = "tumor_type") -> dict[str, str]:
    """patient_id -> stratum: the first known class of `task` among its tumors ('?' if none)."""
    out: dict[str, str] = {}
    for r in cohort.rows:
        label = r.labels.get(task, MISSING) if task in cohort.schema else MISSING
        if out.get(r.patient_id, "?") == "?":
            out[r.patient_id] = "?" if label == MISSING else cohort.schema[task].classes[label]
    return out


def split_patients(groups: dict[str, str], *, test_fraction: float = 0.2, seed: int = 0):
    """Patient-level split, stratified by group -> (train ids, test ids), sorted.

    Deterministic for a seed and independent of row order: ids are sorted, then shuffled per
    group with numpy's default_rng(seed); round(n * test_fraction) of each group go to test.
    """
    if not 0.0 <= test_fraction < 1.0:
        raise InputError(f"split.test_fraction: must be in [0, 1), got {test_fraction}")
    by_group: dict[str, list[str]] = defaultdict(list)
    for pid, g in groups.items():
        by_group[g].append(pid)
    rng = np.random.default_rng(seed)
    test: list[str] = []
    for g in sorted(by_group):
        ids = sorted(by_group[g])
        order = rng.permutation(len(ids))
        test += [ids[j] for j in order[: round(len(ids) * test_fraction)]]
    test_set = set(test)
    return sorted(p for p in groups if p not in test_set), sorted(test_set)


def split_scan_ids(cohort: Cohort, *, test_fraction: float = 0.2, seed: int = 0) -> tuple[list[str], list[str]]:
    """The patient-level split as scan ids -> (training scans, held-out scans), sorted."""
    train_p, test_p = split_patients(patient_groups(cohort), test_fraction=test_fraction, seed=seed)
    by_patient = cohort.patients()
    return (sorted(s for p in train_p for s in by_patient[p]), sorted(s for p in test_p for s in by_patient[p]))


def record_split(cohort: Cohort, *, test_fraction: float, seed: int) -> dict:
    """The split as the exported model records it: the seed and fraction that made it, and the
    keyed ids of its training and held-out patients (HMAC with a salt of the model's own; no raw
    id), so that any later evaluation takes the split from the model, never from a config."""
    train_p, test_p = split_patients(patient_groups(cohort), test_fraction=test_fraction, seed=seed)
    salt = secrets.token_hex(16)
    return {"test_fraction": test_fraction, "seed": seed, "salt": salt,
            "train_patients": sorted(keyed_id(p, salt.encode()) for p in train_p),
            "test_patients": sorted(keyed_id(p, salt.encode()) for p in test_p)}


def split_of_model(cohort: Cohort, meta: dict, *, where: str) -> tuple[list[str], list[str]]:
    """The model's recorded split applied to a manifest -> (training scan ids, held-out scan ids).

    Refuses a manifest with patients the model's split does not know (another cohort, or one that
    grew since training) and a model that records no split."""
    split = meta.get("extra", {}).get("split")
    if not split:
        raise InputError(f"{where}: the model records no training split (exported before split recording); "
                         "train it again to evaluate it")
    salt = split["salt"].encode()
    train_keys, test_keys = set(split["train_patients"]), set(split["test_patients"])
    side = {}
    for pid in cohort.patients():
        k = keyed_id(pid, salt)
        side[pid] = "train" if k in train_keys else "test" if k in test_keys else None
    unknown = sum(v is None for v in side.values())
    if unknown:
        raise InputError(f"{cohort.path}: {unknown} of {len(side)} patients are in neither split of the model "
                         f"{where} (it was trained on another manifest: {len(train_keys)} training and "
                         f"{len(test_keys)} held-out patients)")
    scans = cohort.scans()
    train = sorted(s for s, rows in scans.items() if side[rows[0].patient_id] == "train")
    test = sorted(s for s, rows in scans.items() if side[rows[0].patient_id] == "test")
    if not test:
        raise InputError(f"{cohort.path}: none of the model's held-out patients is in this manifest")
    return train, test
