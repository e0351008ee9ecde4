"""Embedding shards: plain Parquet that DuckDB, pyarrow or pandas read without Ray.

One row per tumor. The embedding is `fixed_size_list<float32>[C]` (not Ray's tensor extension);
boxes and centroids are fixed-size lists too. No raw patient id: `patient_key` and `scan_key` are
keyed hashes (tumornet.cohort.keyed_id; scan ids usually contain the patient id).
Shards are written whole (temp file + rename), so a crash never leaves a partial shard, and a
re-run finds exactly what was done.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import os
from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from tumornet.anatomy import ATLAS_FEATURES
from tumornet.descriptor import vector_size
from tumornet.errors import InputError
from tumornet.handcrafted import FEATURES as HANDCRAFTED
from tumornet.io import atomic_write
from tumornet.labels import INFO_PREFIX


def shard_schema(channels: int, tasks: Sequence[str], *, vector: int | None = None, logits: int = 0,
                 info: Sequence[str] = ()) -> pa.Schema:
    """channels: C of the RoiPool vector; vector: length of the retrieval `embedding` (default C);
    logits: the number of task-head logits (all classes of all tasks); info: the manifest's info_*
    columns (case information, strings, null where a row has none), after every other column."""
    return pa.schema(
        [("scan_key", pa.string()), ("patient_key", pa.string()), ("tumor_id", pa.int32()),
         ("source", pa.string()),  # mask | predicted
         ("bbox", pa.list_(pa.int32(), 6)),  # voxel box on the model's working grid, half-open
         ("bbox_mm", pa.list_(pa.float32(), 6)), ("centroid_mm", pa.list_(pa.float32(), 3)),
         ("volume_ml", pa.float32()), ("size_mm", pa.float32())]  # size: equivalent-sphere diameter
        + [(f"label_{t}", pa.int16()) for t in tasks]  # the manifest's label, -1 missing
        + [(f"pred_{t}", pa.int16()) for t in tasks]  # the recipe's predicted class (descriptor.predicted_classes)
        + [("embedding", pa.list_(pa.float32(), vector or channels)),  # the retrieval vector (descriptor.compose)
           ("roipool", pa.list_(pa.float32(), channels)),  # the paper's RoiPool vector
           ("task_logits", pa.list_(pa.float32(), max(logits, 1))),  # the task heads' logits on it
           ("box_log_volume", pa.float32()),  # log of the box volume in ml
           ("position", pa.list_(pa.float32(), 3)),  # the box centre's place in the head, [-1, 1] per axis
           # its place in template space (tumornet.register), the template brain = [-1, 1]; null when the
           # recipe reads no position (no registration)
           ("template_position", pa.list_(pa.float32(), 3)),
           # what the atlas says of the box there (tumornet.anatomy.ATLAS_FEATURES); null as template_position
           ("atlas", pa.list_(pa.float32(), len(ATLAS_FEATURES))),
           ("seg_log_volume", pa.float32()),  # log of the segmented volume (ml) of the components the box touches
           ("scan_tumors", pa.int16()),  # the number of tumors in the scan (its mask's, or those found)
           ("roimean", pa.list_(pa.float32(), channels)),  # the feature map's mean over the box
           ("context", pa.list_(pa.float32(), channels)),  # its mean over a shell around the box
           ("handcrafted", pa.list_(pa.float32(), len(HANDCRAFTED))),  # tumornet.handcrafted.FEATURES
           ("model_id", pa.string()),
           ("source_hash", pa.string()),  # sha256 of the image and mask files and the embedding settings
           ("embedded_at", pa.timestamp("s", tz="UTC"))]
        + [(c, pa.string()) for c in info]
    )


def model_shard_schema(model, retrieval, info: Sequence[str] = ()) -> pa.Schema:
    """The shard schema of a model (tumornet.network.MultitaskNet) and its retrieval recipe."""
    return shard_schema(model.cfg.channels, model.schema.names,
                        vector=vector_size(retrieval, model.cfg.channels, model.schema),
                        logits=sum(t.n_classes for t in model.schema.tasks), info=info)


NO_TUMOR = "none"  # the `source` of a scan's marker row: read, no tumor found in it (embedder.job)
REMOVED = "removed"  # the `source` of a scan's tombstone row: removed from the archive (embedder.forget)


def no_tumor_row(scan_key: str, patient_key: str, model_id: str, source_hash: str, info: dict) -> dict:
    """The one row a scan without a mask gets when the model finds no tumor in it: it tells the next
    night that the scan was read with these files and settings (so it is not read again), and it
    supersedes the scan's older rows; readers (read_embeddings, the index) never see it."""
    return {"scan_key": scan_key, "patient_key": patient_key, "tumor_id": 0, "source": NO_TUMOR,
            "model_id": model_id, "source_hash": source_hash,
            "embedded_at": datetime.datetime.now(datetime.UTC).replace(microsecond=0), **info}


def tumor_rows(table: pa.Table) -> pa.Table:
    """The rows of tumors: without the marker rows of scans where no tumor was found, nor the tombstones
    of scans removed from the archive."""
    if not table.num_rows:
        return table
    return table.filter(pa.compute.invert(pa.compute.is_in(table["source"], pa.array([NO_TUMOR, REMOVED]))))


def info_of(row: dict) -> dict[str, str]:
    """A shard row's case information: its non-null info_* cells."""
    return {k: v for k, v in row.items() if k.startswith(INFO_PREFIX) and v}


def case_info(row: dict) -> dict[str, str]:
    """info_of by the names a search hit shows: {"outcome": ...} for info_outcome."""
    return {k.removeprefix(INFO_PREFIX): v for k, v in info_of(row).items()}


def write_shard(rows: list[dict], path: Path, schema: pa.Schema) -> None:
    table = pa.Table.from_pylist(rows, schema=schema)
    atomic_write(path, lambda tmp: pq.write_table(table, tmp))


@contextlib.contextmanager
def folder_lock(out_dir: Path, what: str):
    """Hold `<out_dir>/.lock` (an advisory flock, released by the OS when the process ends, however it
    ends) while `what` (embed, compact, forget) writes the folder; another run that finds it held stops with an
    error naming the folder, before it writes anything (a nightly job that overran into the next night's
    start, a compaction during an embedding)."""
    path = Path(out_dir) / ".lock"
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            held = f.read().strip() or "another process"
            raise InputError(f"{out_dir}: {held} is writing this folder; this {what} stops without writing "
                             "(run it again when that one ends)") from None
        f.seek(0)
        f.truncate()
        f.write(f"{what} (pid {os.getpid()}, since {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M:%S} UTC)")
        f.flush()
        try:
            yield
        finally:
            f.truncate(0)
            fcntl.flock(f, fcntl.LOCK_UN)


def shard_files(out_dir: Path) -> list[Path]:
    return sorted(p for p in Path(out_dir).glob("*.parquet") if not p.name.startswith(".tmp-"))


def newest_rows(table: pa.Table) -> pa.Table:
    """Each scan's newest rows per model (a scan re-embedded after its files changed supersedes its
    old rows), each (scan, model, tumor) once (a compaction interrupted before it removed the old
    files leaves identical copies)."""
    cols = [table[c].to_pylist() for c in ("scan_key", "model_id", "embedded_at", "tumor_id")]
    newest: dict[tuple[str, str], object] = {}
    for scan, mid, at, _ in zip(*cols, strict=True):
        if newest.get((scan, mid)) is None or at > newest[(scan, mid)]:
            newest[(scan, mid)] = at
    seen, keep = set(), []
    for scan, mid, at, tid in zip(*cols, strict=True):
        ok = newest[(scan, mid)] == at and (scan, mid, tid) not in seen
        if ok:
            seen.add((scan, mid, tid))
        keep.append(ok)
    return table.filter(pa.array(keep))


def read_shard_files(files: list[Path], model_id: str | None) -> pa.Table:
    tables = []
    for f in files:
        t = pq.read_table(f)
        tables.append(t if model_id is None else t.filter(pa.compute.equal(t["model_id"], model_id)))
    try:
        return pa.concat_tables(tables, promote_options="default")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise InputError(f"shards of models with different vector sizes: choose one model id ({e})") from None


def read_embeddings(out_dir: str | Path, *, model_id: str | None = None, latest: bool = True) -> pa.Table:
    """All shards of `out_dir` as one table (optionally one model's rows only). latest: each scan's
    newest rows per model, each tumor once."""
    files = shard_files(Path(out_dir))
    if not files:
        raise InputError(f"{out_dir}: no embedding shards (*.parquet)")
    table = read_shard_files(files, model_id)
    return tumor_rows(newest_rows(table) if latest and table.num_rows else table)


def compact_shards(out_dir: str | Path, *, rows_per_file: int = 200_000, log=print) -> dict:
    """Rewrite the shards into few large files: per model, the rows a reader would see (each scan's
    newest rows, each tumor once), sorted by scan key, `rows_per_file` a file. New files are written
    whole first (temp file + rename), then the old ones removed: a crash in between leaves identical
    copies, which readers count once; readers give the same answer before and after."""
    if rows_per_file < 1:
        raise InputError(f"--rows-per-file: expected >= 1, got {rows_per_file}")
    out = Path(out_dir)
    if not shard_files(out):
        raise InputError(f"{out}: no embedding shards (*.parquet)")
    with folder_lock(out, "compact"):
        files = shard_files(out)  # as the lock finds them: no embedding writes beside a compaction
        by_model: dict[str, list[Path]] = {}
        rows_before = 0
        for f in files:
            t = pq.read_table(f, columns=["model_id"])
            rows_before += t.num_rows
            for mid in set(t["model_id"].to_pylist()):
                by_model.setdefault(mid, []).append(f)
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%S")
        written: list[Path] = []
        for mid, model_files in sorted(by_model.items()):
            table = newest_rows(read_shard_files(model_files, mid))
            order = pa.compute.sort_indices(table, sort_keys=[("scan_key", "ascending"), ("tumor_id", "ascending")])
            table = table.take(order)
            for n, start in enumerate(range(0, table.num_rows, rows_per_file)):
                path = out / f"compact-{mid}-{stamp}-{n:05d}.parquet"
                chunk = table.slice(start, rows_per_file)
                atomic_write(path, lambda tmp, chunk=chunk: pq.write_table(chunk, tmp))
                written.append(path)
        for f in files:
            if f not in written:
                f.unlink()
        rows_after = sum(pq.ParquetFile(f).metadata.num_rows for f in written)
        report = {"files_before": len(files), "files_after": len(written), "rows_before": rows_before,
                  "rows_after": rows_after, "models": len(by_model)}
        log(f"compact: {len(files)} files ({rows_before} rows) -> {len(written)} files ({rows_after} rows, "
            f"{rows_before - rows_after} superseded or duplicate rows dropped)")
        return report


def done_scans(out_dir: str | Path, model_id: str, tasks: Sequence[str] = ()) -> dict[str, tuple[str, tuple]]:
    """scan_key -> (source_hash, what its rows say of the manifest: stored_rows) of each scan's newest
    rows that `model_id` embedded into `out_dir` (only the newest: files or settings changed and changed
    back are embedded again, since readers see the newest rows). `tasks`: the label columns read."""
    cols = ["scan_key", "model_id", "source_hash", "embedded_at", "tumor_id", "patient_key", "source",
            *(f"label_{t}" for t in tasks)]
    tables = []
    for f in shard_files(Path(out_dir)):
        info = [c for c in pq.read_schema(f).names if c.startswith(INFO_PREFIX)]
        t = pq.read_table(f, columns=cols + info)
        tables.append(t.filter(pa.compute.equal(t["model_id"], model_id)))
    tables = [t for t in tables if t.num_rows]
    if not tables:
        return {}
    t = newest_rows(pa.concat_tables(tables, promote_options="default"))
    rows: dict[str, list[dict]] = {}
    for r in t.to_pylist():
        rows.setdefault(r["scan_key"], []).append(r)
    return {key: (rs[0]["source_hash"], stored_rows(
        rs[0]["patient_key"], [(r["tumor_id"], tuple(r[f"label_{k}"] for k in tasks), info_of(r)) for r in rs],
        masked=rs[0]["source"] == "mask")) for key, rs in rows.items()}


def stored_rows(patient_key: str, tumors: Sequence[tuple[int, tuple[int, ...], dict]], *, masked: bool) -> tuple:
    """What a scan's shard rows copy from its manifest rows: (the patient's key, "mask", each tumor's id,
    labels and case information (info_* cells)) for a scan with a mask; (the patient's key, "found", the
    case information of its one row) for a scan without one (its tumors were found, the manifest names
    none). A scan whose manifest rows say otherwise now (a label corrected, a patient merged, a tumor
    added, an outcome recorded) is written again, its files unchanged (embedder.job)."""
    def info(d: dict) -> tuple:
        return tuple(sorted((k, str(v)) for k, v in d.items() if v))

    if not masked:
        return (patient_key, "found", info(tumors[0][2]) if tumors else ())
    return (patient_key, "mask",
            tuple(sorted((int(i), tuple(int(v) for v in labels), info(d)) for i, labels, d in tumors)))


def same_tumors(stored: tuple, now: tuple) -> bool:
    """Two stored_rows of a scan name the same tumors (only labels, case information or the patient
    differ): its rows can be rewritten without a forward pass when its files are unchanged too."""
    if stored[1] != now[1]:
        return False
    return now[1] == "found" or [t[0] for t in stored[2]] == [t[0] for t in now[2]]


def rewrite_rows(out_dir: str | Path, model_id: str, updates: dict[str, dict], schema: pa.Schema, stamp: str,
                 rows_per_file: int = 200_000) -> int:
    """The newest rows of `model_id` for the scans of `updates` (scan_key -> {"patient_key", "tumors":
    {tumor_id: {column: value}}} or {"patient_key", "all": {column: value}}), their copied columns
    replaced (every info_* column cleared first, so a cell emptied in the manifest empties), written anew
    with a newer `embedded_at` (they supersede the old rows); vectors, predictions and the source hash are
    kept -> rows written."""
    files = shard_files(Path(out_dir))
    if not updates or not files:
        return 0
    table = newest_rows(read_shard_files(files, model_id))
    table = table.filter(pa.compute.is_in(table["scan_key"], pa.array(sorted(updates))))
    now = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    rows = []
    for r in table.to_pylist():
        u = updates[r["scan_key"]]
        r.update({k: None for k in r if k.startswith(INFO_PREFIX)})
        r.update(u["all"] if "all" in u else u["tumors"].get(r["tumor_id"], {}))
        r["patient_key"] = u["patient_key"]
        r["embedded_at"] = max(now, r["embedded_at"] + datetime.timedelta(seconds=1))  # newer than what it supersedes
        rows.append(r)
    for n, start in enumerate(range(0, len(rows), rows_per_file)):
        write_shard(rows[start:start + rows_per_file], Path(out_dir) / f"relabel-{model_id}-{stamp}-{n:05d}.parquet",
                    schema)
    return len(rows)
