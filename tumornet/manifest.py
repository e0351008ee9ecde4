"""Cohort manifest: read + validate (one row per tumor), scans and patients of a cohort.

A manifest is one table (CSV or Parquet), one row per tumor, paths relative to the table's folder:

    patient_id, scan_id, image, mask, tumor_id, <one column per task>[, tumor_values]

- image / mask: NIfTI (.nii or .nii.gz) inside the manifest's folder (no absolute paths, no `..`
  escaping it, no symlink pointing out of it).
- mask: an instance mask (voxel value = tumor_id). With the optional `tumor_values` column (e.g.
  "1 3" for BraTS necrosis + enhancing tumor) the mask is a label map instead: voxels with those
  values form the tumor mask, other values are ignored, and tumors are its 26-connected
  components numbered by decreasing size (tumors.py), so tumor_id 1 is the largest.
- task columns: class names of the label schema; an empty cell is a missing label (-1).
- `info_*` columns (optional, any number): case information a site keeps with each tumor (e.g.
  info_outcome, info_dose_gy): not read by training; `embed` copies them into the shards and `search`
  shows them beside each hit. They must not identify a patient (a cell holding the row's patient id is
  refused; anything else is the site's to keep out).
Every problem is reported with the manifest's path, the row number (1-based, data rows) and the
column; patient identifiers are never echoed.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from .errors import InputError
from .io import write_table_csv
from .labels import DEFAULT_SCHEMA, INFO_PREFIX, LabelSchema, is_info_column

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
    mask: Path | None  # None: no mask, the tumors are found by the segmentation head (embed only)
    tumor_id: int  # 0 when there is no mask
    labels: dict[str, int]
    tumor_values: tuple[int, ...] | None = None
    info: dict[str, str] = field(default_factory=dict)  # the row's non-empty info_* cells, keyed by column


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


def _unmasked_row(i: int, raw: dict[str, str], root: Path, schema: LabelSchema, where: str, check_files: bool):
    """A row with an empty mask cell (embed only): one row for the whole scan, no tumor id, no labels."""
    filled = [c for c in ("tumor_id", "tumor_values", *schema.names) if raw.get(c, "").strip()]
    if filled:
        raise InputError(f"{where}: a row without a mask is one scan whose tumors the model finds; leave "
                         f"{filled} empty")
    return ManifestRow(row=i, patient_id=raw["patient_id"].strip(), scan_id=raw["scan_id"].strip(),
                       image=_inside(root, raw.get("image", "").strip(), where=f"{where} column 'image'",
                                     check_files=check_files),
                       mask=None, tumor_id=0, labels={}, info=_info(raw, where))


def _info(raw: dict[str, str], where: str) -> dict[str, str]:
    """A row's non-empty info_* cells; a cell holding the row's patient id is refused (no raw patient
    identifier reaches an output)."""
    pid = raw.get("patient_id", "").strip()
    out = {}
    for c, v in raw.items():
        if not (c and is_info_column(c)) or not (v := str(v or "").strip()):
            continue
        if len(pid) > 2 and pid in v:
            raise InputError(f"{where} column '{c}': holds the patient id; case information must not identify "
                             "a patient")
        out[c] = v
    return out


def _parse_row(i: int, raw: dict[str, str], root: Path, schema: LabelSchema, name: str, check_files: bool,
               unmasked: bool = False):
    where = f"{name} row {i}"
    for col in ("patient_id", "scan_id"):
        if not raw.get(col, "").strip():
            raise InputError(f"{where} column '{col}': empty")
    if not raw.get("mask", "").strip():
        if unmasked:
            return _unmasked_row(i, raw, root, schema, where, check_files)
        raise InputError(f"{where} column 'mask': empty path (a scan without a mask can only be embedded, its "
                         "tumors found by the model: `embed`)")
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
        info=_info(raw, where),
    )


@dataclass(frozen=True, kw_only=True)
class RowError:
    """One invalid manifest row (lenient reading): its 1-based row number, its scan id ('' when the
    row has none), the problem in words, and the row's identifying cells (ids and paths), which a
    writer of persisted outputs replaces before storing the message (`redact`)."""

    row: int
    scan_id: str
    message: str
    cells: tuple[str, ...] = ()

    def redacted(self) -> str:
        return redact(self.message, self.cells)


CELL_TOKENS = ("<patient>", "<scan>", "<image>", "<mask>")


def redact(message: str, cells) -> str:
    """A message without a row's identifying cells: (patient_id, scan_id, image, mask) values,
    replaced by <patient>, <scan>, <image>, <mask> (longest first, so a path holding an id goes whole)."""
    pairs = [(str(c), t) for c, t in zip(cells, CELL_TOKENS, strict=False) if c and len(str(c)) > 2]
    for c, t in sorted(pairs, key=lambda p: len(p[0]), reverse=True):
        message = message.replace(c, t)
    return message


def _validate(path: Path, schema: LabelSchema, check_files: bool,
              unmasked: bool = False) -> tuple[list[ManifestRow], list[RowError]]:
    """Every row checked; -> (valid rows of valid scans, row errors). Table-level problems (no file,
    unreadable, missing or unknown columns, no rows) raise: no row can be trusted then."""
    columns, raw_rows = _read_table(path)
    missing = [c for c in (*REQUIRED, *schema.names) if c not in columns]
    if missing:
        raise InputError(f"{path}: missing column(s) {missing}; the header has {columns}")
    unknown = [c for c in columns if c not in (*REQUIRED, *OPTIONAL, *schema.names) and not is_info_column(c)]
    if unknown:
        raise InputError(f"{path}: unknown column(s) {unknown}; a task column must be declared under "
                         f"'tasks:' in the config (tasks now: {list(schema.names)}); case information goes in "
                         f"columns named {INFO_PREFIX}*")
    if not raw_rows:
        raise InputError(f"{path}: the manifest has no rows")
    errors: list[RowError] = []
    rows: list[ManifestRow] = []
    cells = {}
    for i, raw in enumerate(raw_rows, start=1):
        cells[i] = tuple(raw.get(c, "") for c in ("patient_id", "scan_id", "image", "mask"))
        try:
            rows.append(_parse_row(i, raw, path.parent, schema, path.name, check_files, unmasked))
        except InputError as e:
            errors.append(RowError(row=i, scan_id=raw.get("scan_id", "").strip(), message=str(e), cells=cells[i]))
    first: dict[str, ManifestRow] = {}
    seen: dict[tuple[str, int], int] = {}
    for r in rows:
        f = first.setdefault(r.scan_id, r)
        for attr in ("patient_id", "image", "mask", "tumor_values"):
            if getattr(r, attr) != getattr(f, attr):
                errors.append(RowError(row=r.row, scan_id=r.scan_id, cells=cells[r.row],
                                       message=f"{path.name} row {r.row} column '{attr}': differs from row {f.row} "
                                               "of the same scan_id"))
        key = (r.scan_id, r.tumor_id)
        if key in seen:
            errors.append(RowError(row=r.row, scan_id=r.scan_id, cells=cells[r.row],
                                   message=f"{path.name} row {r.row}: tumor_id {r.tumor_id} of this scan already on "
                                           f"row {seen[key]}"))
        seen.setdefault(key, r.row)
    bad_scans = {e.scan_id for e in errors if e.scan_id}
    bad_rows = {e.row for e in errors}
    for r in rows:  # a scan with an invalid row is not embedded at all: its other rows say so
        if r.scan_id in bad_scans and r.row not in bad_rows:
            errors.append(RowError(row=r.row, scan_id=r.scan_id, cells=cells[r.row],
                                   message=f"{path.name} row {r.row}: another row of the same scan_id is invalid "
                                           "(the scan is skipped)"))
    return [r for r in rows if r.scan_id not in bad_scans], sorted(errors, key=lambda e: e.row)


def read_manifest(path: str | Path, schema: LabelSchema = DEFAULT_SCHEMA, *, check_files: bool = True) -> Cohort:
    """Read and validate a manifest, strictly: all problems found are reported together (up to 25)."""
    path = Path(path)
    rows, errors = _validate(path, schema, check_files)
    if errors:
        errors = [e for e in errors if "another row of the same scan_id is invalid" not in e.message]
        more = f"\n  ... and {len(errors) - MAX_REPORTED} more" if len(errors) > MAX_REPORTED else ""
        listed = "\n  ".join(e.message for e in errors[:MAX_REPORTED])
        raise InputError(f"{path}: {len(errors)} problem(s):\n  " + listed + more)
    return Cohort(path, tuple(rows), schema)


def read_manifest_lenient(path: str | Path, schema: LabelSchema = DEFAULT_SCHEMA, *,
                          check_files: bool = False) -> tuple[Cohort, list[RowError]]:
    """Read a manifest row by row (the nightly job): -> (the valid scans, the invalid rows). An
    invalid row skips its scan; every other scan is kept. Table-level problems still raise. A row
    may leave `mask` empty (and then tumor_id and the labels too): one row for a scan whose tumors
    the model finds."""
    path = Path(path)
    rows, errors = _validate(path, schema, check_files, unmasked=True)
    return Cohort(path, tuple(rows), schema), errors


def folder_cohort(folder: str | Path, schema: LabelSchema = DEFAULT_SCHEMA) -> Cohort:
    """A plain folder of NIfTI files, no manifest: every .nii / .nii.gz below it is one scan without a
    mask; its path relative to the folder (without the suffix) is its scan and patient id."""
    root = Path(folder).resolve()
    if not root.is_dir():
        raise InputError(f"{folder}: not a folder")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name.endswith(NIFTI_SUFFIXES)
                   and p.resolve().is_relative_to(root))  # a link out of the folder is not followed
    if not files:
        raise InputError(f"{folder}: no NIfTI file (.nii or .nii.gz) in this folder")
    rows = []
    for i, p in enumerate(files, start=1):
        rel = p.relative_to(root).as_posix()
        sid = rel.removesuffix(".gz").removesuffix(".nii")
        rows.append(ManifestRow(row=i, patient_id=sid, scan_id=sid, image=p, mask=None, tumor_id=0, labels={}))
    return Cohort(root / "(folder)", tuple(rows), schema)


def manifest_columns(schema: LabelSchema = DEFAULT_SCHEMA, *, tumor_values: bool = False) -> list[str]:
    return [*REQUIRED, *schema.names, *(["tumor_values"] if tumor_values else [])]


def write_manifest(path: str | Path, rows: list[dict], schema: LabelSchema = DEFAULT_SCHEMA, *,
                   tumor_values: bool = False) -> Path:
    """Write manifest rows (dicts keyed by column; label cells as class names, "" for missing) as CSV."""
    return write_table_csv(path, rows, manifest_columns(schema, tumor_values=tumor_values))
