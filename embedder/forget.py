"""Removing patients or scans from an archive (`ray_job.py forget`): a patient who withdrew consent, a
scan filed under the wrong patient.

    ray_job.py forget --embeddings /archive/embeddings --patients-file withdrawn.txt --secret-file site.key
    ray_job.py forget --embeddings /archive/embeddings --patient-key 9c1d02e4a7b3f560 --scan-key 3f2a9c0d1e4b5a67

Under the folder's lock (embedder.shards.folder_lock): every model's rows of those scans are superseded
by one tombstone row each (`source = removed`, no vectors, no labels: readers never see it), the keys
are recorded in `<out>/forgotten.jsonl`, so that no later `embed` puts them back while the manifest
still lists them (it skips them, recorded), and the shards are compacted, so that the removed rows are
gone from the files, not only hidden. The caller rebuilds any index of the folder (ray_job.py does).
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Iterable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from tumornet.errors import InputError
from tumornet.io import atomic_write
from tumornet.keys import check_key, patient_key, read_secret

from .shards import REMOVED, compact_shards, folder_lock, newest_rows, shard_files

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
        stones: dict[str, list[dict]] = {}  # model id -> its tombstone rows
        schemas: dict[str, pa.Schema] = {}
        rows_removed = 0
        files = shard_files(out)
        if files:
            cols = ["scan_key", "patient_key", "model_id", "tumor_id", "embedded_at", "source"]
            table = newest_rows(pa.concat_tables([pq.read_table(f, columns=cols) for f in files]))
            for f in files:  # each model's schema, as its shards have it (the vector sizes differ by model)
                for mid in set(pq.read_table(f, columns=["model_id"])["model_id"].to_pylist()) - set(schemas):
                    schemas[mid] = pq.read_schema(f)
            hit: dict[tuple[str, str], dict] = {}  # (model, scan) -> one of its newest rows
            for r in table.to_pylist():
                if (r["patient_key"] in patients or r["scan_key"] in scans_asked) and r["source"] != REMOVED:
                    rows_removed += r["source"] in ("mask", "predicted")
                    hit.setdefault((r["model_id"], r["scan_key"]), r)
            for (mid, scan), r in sorted(hit.items()):
                at = max(now, r["embedded_at"] + datetime.timedelta(seconds=1))  # newer than what it supersedes
                stones.setdefault(mid, []).append({
                    "scan_key": scan, "patient_key": r["patient_key"], "tumor_id": 0, "source": REMOVED,
                    "model_id": mid, "source_hash": "", "embedded_at": at})
        stamp = now.strftime("%Y%m%dT%H%M%S")
        for mid, rows in sorted(stones.items()):
            t = pa.Table.from_pylist(rows, schema=schemas[mid])
            atomic_write(out / f"forgotten-{mid}-{stamp}.parquet", lambda tmp, t=t: pq.write_table(t, tmp))
        records = [{"at": now.isoformat(), "patient_key": k} for k in sorted(patients)]
        records += [{"at": now.isoformat(), "scan_key": k} for k in sorted(scans_asked)]
        with open(out / FORGOTTEN, "a") as f:
            f.write("".join(json.dumps(r) + "\n" for r in records))
    scans_removed = len({scan for rows in stones.values() for scan in (r["scan_key"] for r in rows)})
    report = {"patient_keys": len(patients), "scan_keys": len(scans_asked), "scans_removed": scans_removed,
              "tumor_rows_removed": int(rows_removed), "models": sorted(stones)}
    log(f"forget: {scans_removed} scan(s) ({rows_removed} tumor row(s) of {len(stones)} model(s)) removed for "
        f"{len(patients)} patient and {len(scans_asked)} scan key(s); recorded in {out / FORGOTTEN}")
    if stones:  # the removed rows gone from the files, not only superseded
        compact_shards(out, log=log)
    return report
