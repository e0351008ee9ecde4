"""Atomic writes and the manifest CSV writer."""

import threading

import pytest

from tumornet.io import atomic_write, atomic_write_text, write_table_csv
from tumornet.manifest import read_manifest, write_manifest


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = atomic_write_text(tmp_path / "a.json", "old")

    def broken(tmp):
        open(tmp, "w").write("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(target, broken)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_concurrent_writers_never_share_a_temporary_file(tmp_path):
    target = tmp_path / "model.pt"
    texts = [str(i) * 100_000 for i in range(8)]
    threads = [threading.Thread(target=atomic_write_text, args=(target, t)) for t in texts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert target.read_text() in texts and [p.name for p in tmp_path.iterdir()] == ["model.pt"]


def test_manifest_writer_round_trips_through_the_reader(subject):
    root, rows = subject
    m = write_manifest(root / "m.csv", rows)
    cohort = read_manifest(m)
    assert [r.tumor_id for r in cohort.rows] == [1, 2] and cohort.rows[1].labels["area"] == -1
    t = write_table_csv(root / "t.csv", [{"a": 1, "b": "x,y", "c": "ignored"}], ["a", "b"])
    assert t.read_text() == 'a,b\n1,"x,y"\n'
