"""Removing one patient from an archive at scale (`ray_job.py forget`), measured in one run:

1. `forget` as it is: each shard file that holds a row of the patient's scans written again without
   it, every other file untouched (embedder.forget);
2. the baseline, what it did before: the whole folder compacted (embedder.shards.compact_shards), on
   an identical copy of the archive (the compaction alone: before, forget also found the rows and wrote
   the tombstones first, so the ratio printed understates the gain a little).

The archive is built from a real shard folder (e.g. the demo's or a site's): its rows repeated under
fresh scan and patient keys (16 hex characters, one patient per `--scans-per-patient` scans) into
files of `--rows-per-file` rows, as nightly shards are, up to `--rows` rows. Prints both times, their
ratio, and the files each rewrote. The index rebuild that follows either is the same for both and is
not timed.

    .venv/bin/python benchmarks/forget_speed.py --embeddings outputs/demo/embeddings [--rows 200000]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from embedder.forget import forget
from embedder.shards import compact_shards, read_embeddings


def build_archive(src: Path, out: Path, rows: int, rows_per_file: int, scans_per_patient: int) -> str:
    """`rows` rows in files of `rows_per_file` -> the patient key of one patient in the middle."""
    real = read_embeddings(src)
    out.mkdir(parents=True)
    n, scan = 0, 0
    while n < rows:
        take = min(rows_per_file, rows - n)
        idx = pa.array([(n + i) % real.num_rows for i in range(take)])
        t = real.take(idx)
        # one scan per real scan's run of rows: keep the real tumor ids, give each repeat new keys
        scans = []
        last = None
        for i, s in enumerate(t["scan_key"].to_pylist()):
            if s != last or i == 0:
                scan, last = scan + 1, s
            scans.append(scan)
        t = t.set_column(t.schema.get_field_index("scan_key"), "scan_key",
                         pa.array([f"{s:016x}" for s in scans], pa.string()))
        t = t.set_column(t.schema.get_field_index("patient_key"), "patient_key",
                         pa.array([f"{s // scans_per_patient:016x}" for s in scans], pa.string()))
        pq.write_table(t, out / f"{t['model_id'][0].as_py()}-shard-{n // rows_per_file:05d}.parquet")
        n += take
    return f"{scan // 2 // scans_per_patient:016x}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--embeddings", required=True, help="a real shard folder whose rows are repeated")
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--rows-per-file", type=int, default=2_000)
    ap.add_argument("--scans-per-patient", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        a, b = Path(tmp) / "a", Path(tmp) / "b"
        patient = build_archive(Path(args.embeddings), a, args.rows, args.rows_per_file, args.scans_per_patient)
        shutil.copytree(a, b)
        files = len(list(a.glob("*.parquet")))
        size = sum(f.stat().st_size for f in a.glob("*.parquet")) / 2**20
        print(f"archive: {args.rows} rows in {files} files ({size:.0f} MiB); removing patient {patient}")
        t0 = time.perf_counter()
        report = forget(a, patient_keys=[patient], log=lambda *_: None)
        ours = time.perf_counter() - t0
        t0 = time.perf_counter()
        compact_shards(b, log=lambda *_: None)
        base = time.perf_counter() - t0
        print(f"forget, the files holding the patient rewritten: {ours:.2f} s ({report['files_rewritten']} of "
              f"{files} files, {report['tumor_rows_removed']} tumor rows removed)")
        print(f"baseline, the whole folder compacted: {base:.2f} s ({files} files rewritten)")
        print(f"speed-up: {base / ours:.1f}x")


if __name__ == "__main__":
    main()
