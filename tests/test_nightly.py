"""The nightly embedding job on a broken archive: bad manifest rows and bad files are recorded one
error row each while every valid scan is embedded; exit status by failure share; a driver killed
by SIGKILL and re-run; compaction keeps query results identical."""

import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import ROOT, SECRET, write_manifest, write_nifti
from embedder.shards import compact_shards, read_embeddings, shard_files
from retrieval.knn import nearest
from tumornet.errors import InputError
from tumornet.export import export_model
from tumornet.keys import keyed_id
from tumornet.labels import DEFAULT_SCHEMA
from tumornet.manifest import read_manifest, read_manifest_lenient
from tumornet.network import MultitaskNet, NetConfig
from tumornet.volumes import read_nifti

# bad file cases: name -> (expected stage, expected error class, what the message says)
FILE_CASES = {
    "truncated": ("read", ("header_size", "truncated"), "truncated"),  # by the gzip trailer, or while decoding
    "empty_file": ("read", "not_nifti", "empty file"),
    "not_nifti": ("read", "not_nifti", "not a readable NIfTI"),
    "image_2d": ("read", "bad_shape", "expected a 3D volume"),
    "image_4d": ("read", "bad_shape", "expected a 3D volume"),
    "nan": ("read", "non_finite", "NaN/inf voxels"),
    "huge_header": ("read", "header_size", "the header claims 30000 x 30000 x 30000 voxels"),
    "shape_mismatch": ("read", "mismatch", "does not match image"),
    "affine_mismatch": ("read", "mismatch", "mask affine does not match"),
    "empty_mask": ("read", "empty_mask", "empty mask"),
    "missing_file": ("read", "missing_file", "file not found"),
}
ROW_CASES = {  # bad manifest rows -> what the message says
    "empty_mask_path": "a row without a mask is one scan whose tumors the model finds",
    "escaping_path": "escapes the manifest's folder",
    "unknown_label": "glioblastoma?",
    "duplicate": "already on row",
    "missing_patient": "column 'patient_id': empty",
}


def _huge_header(path: Path) -> None:
    """A real .nii.gz whose header claims 30000^3 voxels (dim is int16 at bytes 42-47)."""
    img = nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4))
    raw = bytearray(img.header.binaryblock + b"\0" * 4 + np.zeros(64, np.float32).tobytes())
    raw[42:48] = np.array([30000, 30000, 30000], "<i2").tobytes()
    path.write_bytes(gzip.compress(bytes(raw)))


def _bad_archive(root: Path, small_cohort: Path) -> tuple[Path, int]:
    """The small cohort plus one scan per bad file case and the bad rows -> (manifest, valid scans)."""
    shutil.copytree(small_cohort.parent, root)
    cohort = read_manifest(root / small_cohort.name)
    rows = [{"patient_id": r.patient_id, "scan_id": r.scan_id, "image": str(r.image.relative_to(root)),
             "mask": str(r.mask.relative_to(root)), "tumor_id": r.tumor_id,
             **{t: DEFAULT_SCHEMA[t].classes[v] if v >= 0 else "" for t, v in r.labels.items()}} for r in cohort.rows]
    good = cohort.rows[0]
    img = nib.load(good.image)
    data, mask = np.asarray(img.dataobj, np.float32), np.asarray(nib.load(good.mask).dataobj, np.int16)
    d = root / "bad"
    d.mkdir()
    for case in FILE_CASES:
        image, seg = d / f"{case}_t1c.nii.gz", d / f"{case}_mask.nii.gz"
        write_nifti(image, data, img.affine)
        write_nifti(seg, mask, img.affine)
        if case == "truncated":
            image.write_bytes(image.read_bytes()[: image.stat().st_size // 2])
        elif case == "empty_file":
            image.write_bytes(b"")
        elif case == "not_nifti":
            image.write_text("patient,scan\nP,S\n")
        elif case == "image_2d":
            write_nifti(image, data[:, :, 0], img.affine)
        elif case == "image_4d":
            write_nifti(image, np.stack([data, data], -1), img.affine)
        elif case == "nan":
            bad = data.copy()
            bad[0, 0, 0] = np.nan
            write_nifti(image, bad, img.affine)
        elif case == "huge_header":
            _huge_header(image)
        elif case == "shape_mismatch":
            write_nifti(seg, mask[:-1], img.affine)
        elif case == "affine_mismatch":
            write_nifti(seg, mask, img.affine @ np.diag([1, 1, 1.5, 1]))
        elif case == "empty_mask":
            write_nifti(seg, np.zeros_like(mask), img.affine)
        elif case == "missing_file":
            seg.unlink()
        rows.append({"patient_id": f"BAD-{case}", "scan_id": f"BAD-{case}-00", "image": f"bad/{image.name}",
                     "mask": f"bad/{seg.name}", "tumor_id": 1})
    base = {"image": f"bad/{case}_t1c.nii.gz", "mask": f"bad/{case}_mask.nii.gz", "tumor_id": 1}
    rows += [
        {**base, "patient_id": "ROW-a", "scan_id": "ROW-a-00", "mask": ""},
        {**base, "patient_id": "ROW-b", "scan_id": "ROW-b-00", "image": "../outside.nii.gz"},
        {**base, "patient_id": "ROW-c", "scan_id": "ROW-c-00", "tumor_type": "glioblastoma?"},
        {**rows[0]},  # a duplicate (scan, tumor): the first scan of the cohort is skipped with it
        {**base, "patient_id": "", "scan_id": "ROW-e-00"},
    ]
    return write_manifest(root / "nightly.csv", rows), len(cohort.scans()) - 1


@pytest.fixture
def model_path(tmp_path):
    path = tmp_path / "model.pt"
    export_model(MultitaskNet(NetConfig(channels=8, blocks=1), DEFAULT_SCHEMA).eval(), path,
                 extra={"spacing_mm": [4.0] * 3, "patch_size": 16})
    return path


def test_file_failures_are_named_before_any_allocation(tmp_path):
    _huge_header(tmp_path / "h.nii.gz")
    with pytest.raises(InputError, match="30000 x 30000 x 30000 voxels") as e:
        read_nifti(tmp_path / "h.nii.gz")
    assert e.value.kind == "header_size"
    write_nifti(tmp_path / "ok.nii.gz", np.ones((20, 20, 20), np.float32))
    full = (tmp_path / "ok.nii.gz").read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(full[: len(full) - 20])  # the gzip trailer is gone
    with pytest.raises(InputError) as e:
        read_nifti(tmp_path / "cut.nii.gz")
    assert e.value.kind in ("header_size", "truncated")


def test_lenient_manifest_keeps_every_valid_scan(tmp_path, small_cohort):
    manifest, n_valid = _bad_archive(tmp_path / "a", small_cohort)
    cohort, errors = read_manifest_lenient(manifest)
    assert len(cohort.scans()) == n_valid + len(FILE_CASES)  # bad files are caught later, per scan
    messages = "\n".join(e.message for e in errors)
    for text in ROW_CASES.values():
        assert text in messages
    with pytest.raises(InputError, match="problem"):
        read_manifest(manifest, check_files=False)  # `summary` stays strict
    assert all("BAD-" not in e.redacted() and "ROW-" not in e.redacted() for e in errors)


@pytest.mark.ray
@pytest.mark.slow
def test_nightly_job_records_every_bad_case_and_embeds_every_valid_scan(ray_head, tmp_path, small_cohort, model_path,
                                                                         capsys):
    from ray_job import main

    manifest, n_valid = _bad_archive(tmp_path / "a", small_cohort)
    key = tmp_path / "site.key"
    key.write_bytes(SECRET)
    out = tmp_path / "emb"
    argv = ["embed", "--model", str(model_path), "--manifest", str(manifest), "--out", str(out), "--secret-file",
            str(key), "--workers", "2", "--scans-per-shard", "4"]
    assert main(argv) == 1  # far more than 5 % failed: the scheduler is alerted
    assert "above --max-failure-rate" in capsys.readouterr().err
    report = json.loads((out / "embed-report.json").read_text())["last"]
    assert report["embedded"] == n_valid and report["failed"] == len(FILE_CASES) and not report["ok"]
    table = read_embeddings(out)
    assert len(set(table["scan_key"].to_pylist())) == n_valid
    errors = [json.loads(x) for x in (out / "embed-errors.jsonl").read_text().splitlines()]
    by_scan = {e["scan_key"]: e for e in errors if e["stage"] != "manifest"}
    for case, (stage, cls, text) in FILE_CASES.items():
        e = by_scan[keyed_id(f"BAD-{case}-00", SECRET)]
        assert e["stage"] == stage and e["error_class"] in (cls if isinstance(cls, tuple) else (cls,)), (case, e)
        assert text in e["message"], (case, e)
    manifest_errors = [e for e in errors if e["stage"] == "manifest"]
    first_scan = read_manifest(small_cohort).rows[0].scan_id
    twins = sum(r.scan_id == first_scan for r in read_manifest(small_cohort).rows)  # the duplicated scan's rows
    assert len({e["row"] for e in manifest_errors}) == len(manifest_errors) == len(ROW_CASES) + twins
    blob = json.dumps(errors)
    assert "BAD-" not in blob and "ROW-" not in blob and str(tmp_path) not in blob
    # the same night with a tolerant threshold: nothing new is embedded, the exit status is 0
    assert main([*argv, "--max-failure-rate", "1"]) == 0
    assert json.loads((out / "embed-report.json").read_text())["last"]["unchanged"] == n_valid


@pytest.mark.ray
@pytest.mark.slow
def test_a_killed_driver_and_a_rerun_give_one_row_per_tumor(ray_head, tmp_path, small_cohort, model_path):
    key = tmp_path / "site.key"
    key.write_bytes(SECRET)
    out = tmp_path / "emb"
    cmd = [sys.executable, str(ROOT / "ray_job.py"), "embed", "--model", str(model_path), "--manifest",
           str(small_cohort), "--out", str(out), "--secret-file", str(key), "--workers", "1", "--scans-per-shard", "1"]
    env = {**os.environ, "RAY_ADDRESS": f"127.0.0.1:{ray_head['RAY_PORT']}"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and len(shard_files(out) if out.exists() else []) < 2:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver dies mid-run
    proc.wait(timeout=60)
    partial = len(shard_files(out))
    cohort = read_manifest(small_cohort)
    assert 2 <= partial < len(cohort.scans())
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    table = read_embeddings(out)
    pairs = list(zip(table["scan_key"].to_pylist(), table["tumor_id"].to_pylist(), strict=True))
    assert len(pairs) == len(set(pairs)) == len(cohort.rows)  # exactly one row per tumor


def test_compaction_keeps_query_results_identical(archive, tmp_path):
    emb = tmp_path / "emb"
    shutil.copytree(archive / "emb", emb)
    # a second night re-embedded two scans (newer rows supersede old ones) and a third file split off
    t = read_embeddings(emb)
    import pyarrow as pa
    import pyarrow.parquet as pq

    later = t.slice(0, 3).set_column(t.schema.get_field_index("embedded_at"), "embedded_at",
                                     pa.array([t["embedded_at"][0].as_py().replace(year=2030)] * 3,
                                              type=t.schema.field("embedded_at").type))
    pq.write_table(later, emb / "night2.parquet")
    pq.write_table(t.slice(10, 5), emb / "night3.parquet")  # identical copies: counted once
    before = read_embeddings(emb)
    q = np.stack(before["embedding"].to_numpy(zero_copy_only=False))[:7]
    d0, i0 = nearest(np.stack(before["embedding"].to_numpy(zero_copy_only=False)), q, 5)
    keys0 = [[(before["scan_key"][j].as_py(), before["tumor_id"][j].as_py()) for j in row] for row in i0]
    rep = compact_shards(emb, rows_per_file=10, log=lambda *_: None)
    after = read_embeddings(emb)
    assert rep["files_after"] == len(shard_files(emb)) == -(-after.num_rows // 10) and rep["files_before"] == 3
    assert after.num_rows == before.num_rows == rep["rows_after"]
    d1, i1 = nearest(np.stack(after["embedding"].to_numpy(zero_copy_only=False)), q, 5)
    keys1 = [[(after["scan_key"][j].as_py(), after["tumor_id"][j].as_py()) for j in row] for row in i1]
    # a tumor's distance to itself: 0 or 1e-8 by the summation order of the distance's terms
    assert keys1 == keys0 and np.allclose(d0, d1, rtol=1e-5, atol=1e-6)
    assert compact_shards(emb, rows_per_file=10, log=lambda *_: None)["rows_after"] == after.num_rows  # idempotent
