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


SIDES = ("train", "validation", "test")


def patient_sides(cohort: Cohort, *, test_fraction: float = 0.2, seed: int = 0,
                  validation_fraction: float = 0.0) -> dict[str, list[str]]:
    """-> {"train", "validation", "test": sorted patient ids}. The test patients do not depend on
    validation_fraction (a research run with a validation split holds out the same test patients
    as the final run without one); validation patients are drawn from the rest, stratified the
    same way, `validation_fraction` of all patients."""
    if not 0.0 <= validation_fraction < 1.0 - test_fraction:
        raise InputError(f"data.validation_fraction: must be in [0, 1 - test_fraction), got {validation_fraction}")
    groups = patient_groups(cohort)
    rest, test = split_patients(groups, test_fraction=test_fraction, seed=seed)
    val: list[str] = []
    if validation_fraction > 0:
        share = validation_fraction / (1 - test_fraction)
        rest, val = split_patients({p: groups[p] for p in rest}, test_fraction=share, seed=seed + 1)
    return {"train": rest, "validation": val, "test": test}


def _scans_of(cohort: Cohort, patients) -> list[str]:
    by_patient = cohort.patients()
    return sorted(s for p in patients for s in by_patient[p])


def split_scan_ids(cohort: Cohort, *, test_fraction: float = 0.2, seed: int = 0,
                   validation_fraction: float = 0.0) -> tuple[list[str], list[str], list[str]]:
    """The patient-level split as scan ids -> (training, validation, held-out test scans), sorted."""
    sides = patient_sides(cohort, test_fraction=test_fraction, seed=seed, validation_fraction=validation_fraction)
    return tuple(_scans_of(cohort, sides[k]) for k in SIDES)


def record_split(cohort: Cohort, *, test_fraction: float, seed: int, validation_fraction: float = 0.0) -> dict:
    """The split as the exported model records it: the seed and fractions that made it, and the
    keyed ids of its training, validation and held-out test patients (HMAC with a salt of the
    model's own; no raw id), so that any later evaluation takes the split from the model, never
    from a config."""
    sides = patient_sides(cohort, test_fraction=test_fraction, seed=seed, validation_fraction=validation_fraction)
    salt = secrets.token_hex(16)
    return {"test_fraction": test_fraction, "validation_fraction": validation_fraction, "seed": seed, "salt": salt,
            **{f"{k}_patients": sorted(keyed_id(p, salt.encode()) for p in sides[k]) for k in SIDES}}


def split_of_model(cohort: Cohort, meta: dict, *, where: str, on: str = "test") -> tuple[list[str], list[str]]:
    """The model's recorded split applied to a manifest -> (database scan ids, query scan ids).

    on="test": the held-out test patients are the queries, every other patient the database;
    on="validation": the validation patients are the queries, the training patients the database
    (test patients are left out: choosing a recipe never looks at them).
    Refuses a manifest with patients the model's split does not know (another cohort, or one that
    grew since training) and a model that records no split."""
    if on not in ("test", "validation"):
        raise InputError(f"--on: expected test or validation, got {on!r}")
    split = meta.get("extra", {}).get("split")
    if not split:
        raise InputError(f"{where}: the model records no training split (exported before split recording); "
                         "train it again to evaluate it")
    salt = split["salt"].encode()
    keys = {k: set(split.get(f"{k}_patients", ())) for k in SIDES}
    side = {}
    for pid in cohort.patients():
        h = keyed_id(pid, salt)
        side[pid] = next((k for k in SIDES if h in keys[k]), None)
    unknown = sum(v is None for v in side.values())
    if unknown:
        raise InputError(f"{cohort.path}: {unknown} of {len(side)} patients are in neither split of the model "
                         f"{where} (it was trained on another manifest: {len(keys['train'])} training, "
                         f"{len(keys['validation'])} validation and {len(keys['test'])} held-out patients)")
    database = ("train",) if on == "validation" else ("train", "validation")
    scans = cohort.scans()
    db = sorted(s for s, rows in scans.items() if side[rows[0].patient_id] in database)
    queries = sorted(s for s, rows in scans.items() if side[rows[0].patient_id] == on)
    if not queries:
        raise InputError(f"{cohort.path}: none of the model's {on} patients is in this manifest"
                         + (" (trained without data.validation_fraction)" if on == "validation" else ""))
    return db, queries
