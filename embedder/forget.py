"""Removing patients or scans from an archive (`ray_job.py forget`): a patient who withdrew consent, a
scan filed under the wrong patient.

    ray_job.py forget --embeddings /archive/embeddings --patients-file withdrawn.txt --secret-file site.key
    ray_job.py forget --embeddings /archive/embeddings --patient-key 9c1d02e4a7b3f560 --scan-key 3f2a9c0d1e4b5a67

Under the folder's lock (embedder.shards.folder_lock): every model's rows of those scans are superseded
by one tombstone row each (`source = removed`, no vectors, no labels: readers never see it), the keys
are recorded in `<out>/forgotten.jsonl`, so that no later `embed` puts them back while the manifest
still lists them (it skips them, recorded), and each shard file that holds a row of those scans is
written again without it (the other files are not touched), so that the removed rows are gone from the
files, not only hidden. The tombstones hide the rows from the first moment; a run that stopped before
every file was rewritten is finished by running it again (the files are found from every row, not only
the newest). The caller rebuilds the index of each model touched (ray_job.py does).
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Iterable
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tumornet.errors import InputError
from tumornet.io import atomic_write
from tumornet.keys import check_key, patient_key, read_secret

from .shards import NO_TUMOR, REMOVED, folder_lock, newest_rows, shard_files

FORGOTTEN = "forgotten.jsonl"  # {"at", "patient_key" | "scan_key"} a line


def forgotten_keys(out_dir: str | Path) -> tuple[set[str], set[str]]:
    """(patient keys, scan keys) removed from the folder by `forget`; none when it has no record."""
    path = Path(out_dir) / FORGOTTEN
    patients, scans = set(), set()
    if not path.is_file():
        return patients, scans
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path} line {n}: not a JSON record ({e})") from None
        if "patient_key" in rec:
            patients.add(str(rec["patient_key"]))
        elif "scan_key" in rec:
            scans.add(str(rec["scan_key"]))
        else:
            raise InputError(f"{path} line {n}: expected a patient_key or a scan_key")
    return patients, scans


def keys_of_patients_file(path: str | Path, secret_file: str | Path | None) -> list[str]:
    """Raw patient ids, one a line (blank lines skipped), keyed with the site's secret: the ids stay in
    the file, never on a command line nor in a log."""
    if not secret_file:
        raise InputError("--patients-file: give --secret-file too (the site key the shards were written with)")
    secret, path = read_secret(secret_file), Path(path)
    if not path.is_file():
        raise InputError(f"{path}: patients file not found")
    return [patient_key(line.strip(), secret) for line in path.read_text().splitlines() if line.strip()]


def forget(out_dir: str | Path, *, patient_keys: Iterable[str] = (), scan_keys: Iterable[str] = (),
           log=print) -> dict:
    """Remove the scans of `patient_keys` and the scans `scan_keys` (keyed ids, as in the shards) from
    every model's rows of the folder -> a report (keys, scans and tumor rows removed, models touched)."""
    out = Path(out_dir)
    patients = {check_key(k, "--patient-key") for k in patient_keys}
    scans_asked = {check_key(k, "--scan-key", "scan") for k in scan_keys}
    if not patients and not scans_asked:
        raise InputError("forget: give at least one --patient-key, --scan-key or --patients-file")
    if not out.is_dir():
        raise InputError(f"{out}: not a folder of embedding shards")
    now = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    with folder_lock(out, "forget"):
        files = shard_files(out)
        cols = ["scan_key", "patient_key", "model_id", "tumor_id", "embedded_at", "source"]
        held = {f: pq.read_table(f, columns=cols) for f in files}
        # the scans removed: those asked, and every scan of the patients asked (any row of any model)
        doomed, asked = set(scans_asked), pa.array(sorted(patients), pa.string())
        for t in held.values():
            doomed.update(pc.filter(t["scan_key"], pc.is_in(t["patient_key"], value_set=asked)).to_pylist())
        doomed_array = pa.array(sorted(doomed), pa.string())
        stones = _tombstones(out, held, doomed_array, now)
        records = [{"at": now.isoformat(), "patient_key": k} for k in sorted(patients)]
        records += [{"at": now.isoformat(), "scan_key": k} for k in sorted(scans_asked)]
        with open(out / FORGOTTEN, "a") as f:
            f.write("".join(json.dumps(r) + "\n" for r in records))
        # the rows gone from the files, not only superseded: each file holding one is written again without it
        rewritten, models, rows_removed = 0, set(stones), 0
        for f, t in held.items():
            gone = pc.and_(pc.is_in(t["scan_key"], value_set=doomed_array), pc.not_equal(t["source"], REMOVED))
            if not pc.any(gone).as_py():
                continue
            rows_removed += pc.sum(pc.and_(gone, pc.not_equal(t["source"], NO_TUMOR))).as_py()
            models.update(pc.filter(t["model_id"], gone).to_pylist())
            keep = pq.read_table(f).filter(pc.invert(gone))
            if keep.num_rows:
                atomic_write(f, lambda tmp, keep=keep: pq.write_table(keep, tmp))
            else:
                f.unlink()
            rewritten += 1
    scans_removed = len({r["scan_key"] for rows in stones.values() for r in rows})
    report = {"patient_keys": len(patients), "scan_keys": len(scans_asked), "scans_removed": scans_removed,
              "tumor_rows_removed": int(rows_removed), "files_rewritten": rewritten, "models": sorted(models)}
    log(f"forget: {scans_removed} scan(s) removed for {len(patients)} patient and {len(scans_asked)} scan key(s) "
        f"({rows_removed} tumor row(s) of {len(models)} model(s) taken out of {rewritten} of {len(files)} shard "
        f"file(s)); recorded in {out / FORGOTTEN}")
    if rewritten:
        log("forget: an evaluation or report made from this folder before still shows them: make it again")
    return report


def _tombstones(out: Path, held: dict[Path, pa.Table], doomed: pa.Array, now) -> dict[str, list[dict]]:
    """One tombstone row per model and scan of `doomed` whose newest rows are not one already, written
    into one file per model -> {model id: its tombstone rows}."""
    stones: dict[str, list[dict]] = {}
    rows = [t.filter(pc.is_in(t["scan_key"], value_set=doomed)) for t in held.values()]
    hit: dict[tuple[str, str], dict] = {}  # (model, scan) -> one of its newest rows
    for r in newest_rows(pa.concat_tables(rows)).to_pylist() if rows else []:
        if r["source"] != REMOVED:
            hit.setdefault((r["model_id"], r["scan_key"]), r)
    for (mid, scan), r in sorted(hit.items()):
        at = max(now, r["embedded_at"] + datetime.timedelta(seconds=1))  # newer than what it supersedes
        stones.setdefault(mid, []).append({
            "scan_key": scan, "patient_key": r["patient_key"], "tumor_id": 0, "source": REMOVED,
            "model_id": mid, "source_hash": "", "embedded_at": at})
    stamp = now.strftime("%Y%m%dT%H%M%S")
    for mid, rows in sorted(stones.items()):
        schema = next(pq.read_schema(f) for f, t in held.items()  # the model's schema, as its shards have it
                      if pc.any(pc.equal(t["model_id"], mid)).as_py())
        t = pa.Table.from_pylist(rows, schema=schema)
        atomic_write(out / f"forgotten-{mid}-{stamp}.parquet", lambda tmp, t=t: pq.write_table(t, tmp))
    return stones
