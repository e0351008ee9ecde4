"""`forget`: a patient (or a scan) removed from an archive for good: the rows gone from the shard files
and from the index, search never returns them, and a later embedding that still finds them in its
manifest leaves them out."""

import csv
import json
import shutil

import pyarrow.parquet as pq
import pytest

from conftest import SECRET
from embedder.forget import FORGOTTEN, forget
from embedder.job import run_embedding
from embedder.shards import read_embeddings
from retrieval.search import search_archived
from tumornet.errors import InputError
from tumornet.keys import keyed_id, patient_key
from tumornet.manifest import read_manifest


def _split_shards(emb, parts: int = 6) -> None:
    """The archive's one shard file as `parts` files (a night's shards), rows in scan order."""
    (f,) = emb.glob("*.parquet")
    t = pq.read_table(f)
    t = t.sort_by("scan_key")
    step = -(-t.num_rows // parts)
    for n in range(parts):
        pq.write_table(t.slice(n * step, step), emb / f"part-{n}.parquet")
    f.unlink()


def _json_tail(out: str) -> dict:
    return json.loads(out[out.index("\n{\n") + 1:] if not out.startswith("{") else out)


def test_forget_removes_a_patient_and_a_scan_for_good(archive, small_cohort, tmp_path, capsys):
    from ray_job import main

    emb = tmp_path / "emb"
    shutil.copytree(archive / "emb", emb)
    _split_shards(emb)
    assert main(["index", "--embeddings", str(emb)]) == 0
    cohort = read_manifest(small_cohort)
    patients = cohort.patients()
    gone, other = sorted(patients)[:2]
    stray = patients[other][0]  # one scan of another patient, filed under the wrong one
    (tmp_path / "withdrawn.txt").write_text(f"{gone}\n\n")
    key = tmp_path / "site.key"
    key.write_bytes(SECRET)
    pk, sk = patient_key(gone, SECRET), keyed_id(stray, SECRET)
    before = read_embeddings(emb).to_pylist()
    removed = [r for r in before if r["patient_key"] == pk or r["scan_key"] == sk]
    assert len({r["scan_key"] for r in removed}) == len(patients[gone]) + 1
    shards = {f: f.read_bytes() for f in emb.glob("*.parquet")}
    holding = {f for f in shards if any(r["patient_key"] == pk or r["scan_key"] == sk
                                        for r in pq.read_table(f, columns=["patient_key", "scan_key"]).to_pylist())}
    assert 0 < len(holding) < len(shards)
    capsys.readouterr()

    assert main(["forget", "--embeddings", str(emb), "--patients-file", str(tmp_path / "withdrawn.txt"),
                 "--secret-file", str(key), "--scan-key", sk]) == 0
    report = _json_tail(capsys.readouterr().out)
    mid = before[0]["model_id"]
    assert report == {"patient_keys": 1, "scan_keys": 1, "scans_removed": len(patients[gone]) + 1,
                      "tumor_rows_removed": len(removed), "files_rewritten": len(holding), "models": [mid],
                      "indexes": {mid: "rebuilt"}}
    # only the files that held their rows were written again; every other shard is untouched
    assert all(f.read_bytes() == b for f, b in shards.items() if f not in holding)
    after = read_embeddings(emb).to_pylist()
    assert len(after) == len(before) - len(removed)
    assert not any(r["patient_key"] == pk or r["scan_key"] == sk for r in after)
    # gone from the files, not only hidden: their only rows left are the tombstones (no vector, no label)
    for f in emb.rglob("*.parquet"):
        for r in pq.read_table(f).to_pylist():
            if r["patient_key"] == pk or r["scan_key"] == sk:
                assert f.parent == emb and r["source"] == "removed" and r.get("embedding") is None
                assert r.get("label_tumor_type") is None and r.get("size_mm") is None
    blob = b"".join(p.read_bytes() for p in emb.rglob("*") if p.is_file())
    assert gone.encode() not in blob and stray.encode() not in blob  # raw ids are never written
    # search (from the rebuilt index) never returns them
    q = next(r for r in after if r["patient_key"] != pk)
    (res,) = search_archived(archive / "model.pt", emb, f"{q['scan_key']}:{q['tumor_id']}", k=len(after))
    assert len(res["hits"]) == sum(r["patient_key"] != q["patient_key"] for r in after)
    assert not any(h["patient_key"] == pk or h["scan_key"] == sk for h in res["hits"])
    assert [json.loads(x).keys() - {"at"} for x in (emb / FORGOTTEN).read_text().splitlines()] == [
        {"patient_key"}, {"scan_key"}]

    # the manifest still lists the patient: the next embedding leaves their scans out, recorded
    part = tmp_path / "part"
    with open(small_cohort, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["patient_id"] == gone]
    for r in rows:
        for col in ("image", "mask"):
            (part / r[col]).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(small_cohort.parent / r[col], part / r[col])
    with open(part / "m.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    again = run_embedding(manifest=part / "m.csv", model_path=archive / "model.pt", out_dir=emb, secret_file=key,
                          log=lambda *_: None)
    assert (again["forgotten"], again["embedded"], again["failed"], again["ok"]) == (len(patients[gone]), 0, 0, True)
    errors = [json.loads(x) for x in (emb / "embed-errors.jsonl").read_text().splitlines()]
    assert [e["error_class"] for e in errors] == ["forgotten"] * len(patients[gone])
    assert len(read_embeddings(emb)) == len(after)


def test_forget_refuses_raw_ids_and_needs_a_key(tmp_path, capsys):
    from ray_job import main

    (tmp_path / "emb").mkdir()
    with pytest.raises(InputError, match="give at least one"):
        forget(tmp_path / "emb")
    assert main(["forget", "--embeddings", str(tmp_path / "emb"), "--patient-key", "SYN0001-PATIENT"]) == 2
    err = capsys.readouterr().err
    assert "expected the patient's keyed id" in err and "SYN0001" not in err
    assert main(["forget", "--embeddings", str(tmp_path / "emb"), "--patients-file", "x.txt"]) == 2
    assert "give --secret-file too" in capsys.readouterr().err


def test_forget_interrupted_is_finished_by_running_it_again(archive, small_cohort, tmp_path, monkeypatch):
    """A run that stopped after its tombstones (the rows already hidden) and before every file was
    rewritten: the same command again takes the rows out of the files that still hold them."""
    import embedder.forget as forget_module

    emb = tmp_path / "emb"
    shutil.copytree(archive / "emb", emb)
    _split_shards(emb)
    gone = sorted(read_manifest(small_cohort).patients())[0]
    pk = patient_key(gone, SECRET)
    before = read_embeddings(emb)
    writes = []

    def crash(path, write):  # the tombstone file is written, then the machine stops
        if writes:
            raise KeyboardInterrupt
        writes.append(path)
        return atomic_write(path, write)

    from tumornet.io import atomic_write
    monkeypatch.setattr(forget_module, "atomic_write", crash)
    with pytest.raises(KeyboardInterrupt):
        forget(emb, patient_keys=[pk], log=lambda *_: None)
    assert writes[0].name.startswith("forgotten-")
    hidden = read_embeddings(emb)  # hidden from readers already
    assert len(hidden) < len(before) and pk not in hidden["patient_key"].to_pylist()
    monkeypatch.undo()

    said = []
    report = forget(emb, patient_keys=[pk], log=said.append)
    assert "make it again" in said[-1]  # the outputs made before from this folder
    assert report["scans_removed"] == 0 and report["files_rewritten"] > 0  # the tombstones were there already
    assert report["models"] == [before["model_id"][0].as_py()]
    for f in emb.glob("*.parquet"):
        for r in pq.read_table(f, columns=["patient_key", "source"]).to_pylist():
            assert r["patient_key"] != pk or r["source"] == "removed"
    assert read_embeddings(emb).to_pylist() == hidden.to_pylist()
    assert forget(emb, patient_keys=[pk], log=lambda *_: None)["files_rewritten"] == 0  # nothing left to do
