"""Cohort manifest: read + validate, scans and patients, the patient-level split, scan loading.

A manifest is one table (CSV or Parquet), one row per tumor, paths relative to the table's folder:

    patient_id, scan_id, image, mask, tumor_id, <one column per task>[, tumor_values]

- image / mask: NIfTI (.nii or .nii.gz) inside the manifest's folder (no absolute paths, no `..`
  escaping it, no symlink pointing out of it).
- mask: an instance mask (voxel value = tumor_id). With the optional `tumor_values` column (e.g.
  "1 3" for BraTS necrosis + enhancing tumor) the mask is a label map instead: voxels with those
  values form the tumor mask, other values are ignored, and tumors are its 26-connected
  components numbered by decreasing size (tumors.py), so tumor_id 1 is the largest.
- task columns: class names of the label schema; an empty cell is a missing label (-1).
Every problem is reported with the manifest's path, the row number (1-based, data rows) and the
column; patient identifiers are never echoed.
"""

from __future__ import annotations

import csv
import hashlib
import hmac
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import InputError
from .labels import DEFAULT_SCHEMA, MISSING, LabelSchema
from .tumors import Tumor, instances_from_binary, measure_tumors
from .volumes import Volume, as_spacing, normalize_intensity, read_label_map, read_nifti, resample, spacing_of

REQUIRED = ("patient_id", "scan_id", "image", "mask", "tumor_id")
OPTIONAL = ("tumor_values",)
NIFTI_SUFFIXES = (".nii", ".nii.gz")
MAX_REPORTED = 25


@dataclass(frozen=True, kw_only=True)
class ManifestRow:
    row: int  # 1-based data row in the manifest
    patient_id: str
    scan_id: str
    image: Path  # absolute, inside the manifest's folder
    mask: Path
    tumor_id: int
    labels: dict[str, int]
    tumor_values: tuple[int, ...] | None = None


@dataclass(frozen=True)
class Cohort:
    path: Path
    rows: tuple[ManifestRow, ...]
    schema: LabelSchema

    @property
    def root(self) -> Path:
        return self.path.parent

    def scans(self) -> dict[str, tuple[ManifestRow, ...]]:
        """scan_id -> its rows, in manifest order."""
        out: dict[str, list[ManifestRow]] = defaultdict(list)
        for r in self.rows:
            out[r.scan_id].append(r)
        return {k: tuple(v) for k, v in out.items()}

    def patients(self) -> dict[str, tuple[str, ...]]:
        """patient_id -> its scan ids."""
        out: dict[str, list[str]] = defaultdict(list)
        for scan_id, rows in self.scans().items():
            out[rows[0].patient_id].append(scan_id)
        return {k: tuple(v) for k, v in out.items()}


def _read_table(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    if not path.is_file():
        raise InputError(f"{path}: manifest not found")
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as e:
            raise InputError(f"{path}: not a readable Parquet table ({type(e).__name__}: {e})") from None
        records = table.to_pylist()
        return table.column_names, [{k: "" if v is None else str(v) for k, v in r.items()} for r in records]
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            columns = list(reader.fieldnames or [])
            rows = [{k: (v or "").strip() for k, v in r.items() if k is not None} for r in reader]
    except (UnicodeDecodeError, csv.Error) as e:
        raise InputError(f"{path}: not a readable CSV table ({e})") from None
    return columns, rows


def _inside(root: Path, rel: str, *, where: str, check_files: bool) -> Path:
    if not rel:
        raise InputError(f"{where}: empty path")
    p = Path(rel)
    if p.is_absolute():
        raise InputError(f"{where}: path must be relative to the manifest's folder, got an absolute path")
    full = (root / p).resolve()
    if not full.is_relative_to(root.resolve()):
        raise InputError(f"{where}: path {rel!r} escapes the manifest's folder")
    if not rel.endswith(NIFTI_SUFFIXES):
        raise InputError(f"{where}: {rel!r} is not a NIfTI file name (.nii or .nii.gz)")
    if check_files and not full.is_file():
        raise InputError(f"{where}: file {rel!r} not found")
    return full


def _parse_row(i: int, raw: dict[str, str], root: Path, schema: LabelSchema, name: str, check_files: bool):
    where = f"{name} row {i}"
    for col in ("patient_id", "scan_id"):
        if not raw.get(col, "").strip():
            raise InputError(f"{where} column '{col}': empty")
    tid = raw.get("tumor_id", "").strip()
    try:
        tumor_id = int(float(tid)) if tid and float(tid) == int(float(tid)) else None
    except (ValueError, OverflowError):
        tumor_id = None
    if tumor_id is None or tumor_id < 1:
        raise InputError(f"{where} column 'tumor_id': expected a positive integer, got {tid!r}")
    values = None
    if raw.get("tumor_values", "").strip():
        try:
            values = tuple(int(v) for v in raw["tumor_values"].replace(",", " ").split())
        except ValueError:
            raise InputError(f"{where} column 'tumor_values': expected integers like '1 3', "
                             f"got {raw['tumor_values']!r}") from None
    return ManifestRow(
        row=i,
        patient_id=raw["patient_id"].strip(),
        scan_id=raw["scan_id"].strip(),
        image=_inside(root, raw.get("image", "").strip(), where=f"{where} column 'image'", check_files=check_files),
        mask=_inside(root, raw.get("mask", "").strip(), where=f"{where} column 'mask'", check_files=check_files),
        tumor_id=tumor_id,
        labels=schema.encode(raw, where=f"{where} column "),
        tumor_values=values,
    )


def read_manifest(path: str | Path, schema: LabelSchema = DEFAULT_SCHEMA, *, check_files: bool = True) -> Cohort:
    """Read and validate a manifest; all problems found are reported together (up to 25)."""
    path = Path(path)
    columns, raw_rows = _read_table(path)
    missing = [c for c in (*REQUIRED, *schema.names) if c not in columns]
    if missing:
        raise InputError(f"{path}: missing column(s) {missing}; the header has {columns}")
    unknown = [c for c in columns if c not in (*REQUIRED, *OPTIONAL, *schema.names)]
    if unknown:
        raise InputError(f"{path}: unknown column(s) {unknown}; a task column must be declared under "
                         f"'tasks:' in the config (tasks now: {list(schema.names)})")
    if not raw_rows:
        raise InputError(f"{path}: the manifest has no rows")
    errors: list[str] = []
    rows: list[ManifestRow] = []
    for i, raw in enumerate(raw_rows, start=1):
        try:
            rows.append(_parse_row(i, raw, path.parent, schema, path.name, check_files))
        except InputError as e:
            errors.append(str(e))
    first: dict[str, ManifestRow] = {}
    seen: dict[tuple[str, int], int] = {}
    for r in rows:
        f = first.setdefault(r.scan_id, r)
        for attr in ("patient_id", "image", "mask", "tumor_values"):
            if getattr(r, attr) != getattr(f, attr):
                errors.append(f"{path.name} row {r.row} column '{attr}': differs from row {f.row} of the same scan_id")
        key = (r.scan_id, r.tumor_id)
        if key in seen:
            errors.append(f"{path.name} row {r.row}: tumor_id {r.tumor_id} of this scan already on row {seen[key]}")
        seen.setdefault(key, r.row)
    if errors:
        more = f"\n  ... and {len(errors) - MAX_REPORTED} more" if len(errors) > MAX_REPORTED else ""
        raise InputError(f"{path}: {len(errors)} problem(s):\n  " + "\n  ".join(errors[:MAX_REPORTED]) + more)
    return Cohort(path, tuple(rows), schema)


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


def keyed_id(identifier: str, secret: bytes) -> str:
    """Keyed hash of an identifier (HMAC-SHA256, 16 hex chars): what outputs carry instead of a patient
    or scan id (scan ids usually contain the patient's). The site, holding the secret, maps back."""
    if not secret:
        raise InputError("keyed_id: the site secret is empty")
    return hmac.new(secret, identifier.encode("utf-8"), hashlib.sha256).hexdigest()[:16]


def patient_key(patient_id: str, secret: bytes) -> str:
    return keyed_id(patient_id, secret)


@dataclass(frozen=True, kw_only=True)
class Scan:
    """A scan ready for training / embedding: volume, instance mask on its grid, tumor records."""

    volume: Volume
    instances: np.ndarray  # (X, Y, Z) int32, tumor ids on the volume's grid
    tumors: tuple[Tumor, ...]


def read_instances(first: ManifestRow, like=None) -> tuple[np.ndarray, np.ndarray]:
    """A scan's mask as an instance mask (applying `tumor_values`) on its native grid -> (mask, affine)."""
    mask, affine = read_label_map(first.mask, like=like)
    if first.tumor_values is not None:
        mask = instances_from_binary(np.isin(mask, first.tumor_values))
    return mask, affine


def load_scan(rows: Sequence[ManifestRow], *, spacing_mm=None, normalize: bool = True) -> Scan:
    """Load one scan's image and mask (rows of one scan_id) -> Scan with labelled Tumor records.

    Tumor measurements come from the mask on its native grid (exact volumes); boxes are given on
    the resampled working grid.
    """
    first = rows[0]
    data, affine = read_nifti(first.image)
    mask, _ = read_instances(first, like=(data, affine, first.image))
    if not (mask > 0).any():
        raise InputError(f"{first.mask}: empty mask (no tumor voxel)")
    spacing = as_spacing(spacing_mm)
    image, grid = resample(data, affine, spacing, order=1)
    instances, _ = resample(mask, affine, spacing, order=0)
    tumors = measure_tumors(
        mask, affine, scan_id=first.scan_id, grid_affine=grid, grid_shape=image.shape,
        tumor_ids=[r.tumor_id for r in rows], labels={r.tumor_id: r.labels for r in rows},
        where=f"{first.mask} (manifest rows {[r.row for r in rows]})",
    )
    if normalize:
        image = normalize_intensity(image)
    volume = Volume(array=image.astype(np.float32), spacing_mm=spacing_of(grid), affine=grid, scan_id=first.scan_id)
    return Scan(volume=volume, instances=instances.astype(np.int32), tumors=tuple(tumors))
