"""Archive embedding: per-scan rows, the shard format, and the Ray Data job (marked ray + slow)."""

import csv
import dataclasses
import json
import shutil

import nibabel as nib
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from embedder.embed import embed_scan
from embedder.job import run_embedding
from embedder.shards import (
    compact_shards,
    folder_lock,
    read_embeddings,
    same_tumors,
    shard_files,
    shard_schema,
    stored_rows,
    write_shard,
)
from retrieval.search import format_search, search_archived
from tumornet.errors import InputError
from tumornet.export import export_model, load_model
from tumornet.keys import keyed_id, patient_key, read_secret
from tumornet.labels import DEFAULT_SCHEMA
from tumornet.manifest import read_manifest
from tumornet.network import MultitaskNet, NetConfig
from tumornet.patches import centred_patch, patch_size_for
from tumornet.scans import load_scan

SECRET = b"0123456789abcdef-site-key"


def _model(seed=0):
    torch.manual_seed(seed)
    return MultitaskNet(NetConfig(channels=8, blocks=1), DEFAULT_SCHEMA).eval()


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "model.pt"
    mid = export_model(_model(), path, extra={"spacing_mm": [4.0, 4.0, 4.0], "patch_size": 16})
    return path, mid


@pytest.fixture
def secret_file(tmp_path):
    p = tmp_path / "site.key"
    p.write_bytes(SECRET)
    return p


def test_embed_scan_gives_the_roipool_vector_of_each_tumor(small_cohort):
    cohort = read_manifest(small_cohort)
    rows = next(r for r in cohort.scans().values() if len(r) > 1)  # a scan with several tumors
    model = _model()
    out = embed_scan(model, "m1", rows, spacing_mm=4.0, patch_size=16, secret=SECRET)
    scan = load_scan(rows, spacing_mm=4.0)
    assert [r["tumor_id"] for r in out] == [t.tumor_id for t in scan.tumors] and len(out) == len(rows)
    for r, t in zip(out, scan.tumors, strict=True):
        patch, box, frame = centred_patch(scan.volume.array, t.bbox, patch_size_for(t.bbox, 16))
        expected = model.embed(patch, box, frame)[0]
        assert np.allclose(r["embedding"], expected.numpy(), atol=1e-5) and len(r["embedding"]) == 8
        assert r["bbox"] == t.bbox.tolist() and r["size_mm"] == pytest.approx(t.size_mm)
        assert all(0 <= r[f"pred_{k}"] < DEFAULT_SCHEMA[k].n_classes for k in DEFAULT_SCHEMA.names)
        assert r["label_tumor_type"] == t.labels.get("tumor_type", -1)
        assert r["scan_tumors"] == len(scan.tumors) >= 2  # how many tumors the scan holds (retrieval.scan_count)
    assert out[0]["patient_key"] == patient_key(rows[0].patient_id, SECRET) != rows[0].patient_id
    assert out[0]["scan_key"] == keyed_id(rows[0].scan_id, SECRET) != out[0]["patient_key"]
    assert len(out[0]["source_hash"]) == 64 and out[0]["model_id"] == "m1" and out[0]["source"] == "mask"


def test_patch_grows_to_hold_a_large_tumor():
    assert patch_size_for(np.array([0, 0, 0, 10, 5, 5]), 16) == 20
    assert patch_size_for(np.array([0, 0, 0, 4, 4, 4]), 16) == 16


def _row(scan, at, value, c=4):
    tasks = DEFAULT_SCHEMA.names
    return {"scan_key": scan, "patient_key": "k", "tumor_id": 1, "source": "mask", "bbox": [0, 0, 0, 1, 1, 1],
            "bbox_mm": [0.0] * 6, "centroid_mm": [0.0] * 3, "volume_ml": 1.0, "size_mm": 12.4,
            **{f"label_{t}": -1 for t in tasks}, **{f"pred_{t}": 0 for t in tasks},
            "embedding": [value] * c, "model_id": "m", "source_hash": "h", "embedded_at": at}


def test_shards_are_plain_arrow_and_keep_the_newest_rows_of_a_scan(tmp_path):
    import datetime

    t0 = datetime.datetime(2026, 11, 1, tzinfo=datetime.UTC)
    t1 = t0 + datetime.timedelta(days=1)
    schema = shard_schema(4, DEFAULT_SCHEMA.names)
    write_shard([_row("a", t0, 1.0), _row("b", t0, 2.0)], tmp_path / "s1.parquet", schema)
    write_shard([_row("a", t1, 3.0)], tmp_path / "s2.parquet", schema)
    raw = pq.read_table(tmp_path / "s1.parquet")
    assert raw.schema.field("embedding").type == pa.list_(pa.float32(), 4)  # fixed_size_list, no Ray extension
    assert b"ray" not in json.dumps(str(raw.schema.metadata)).encode().lower()
    t = read_embeddings(tmp_path)
    got = dict(zip(t["scan_key"].to_pylist(), [e[0] for e in t["embedding"].to_pylist()], strict=True))
    assert got == {"a": 3.0, "b": 2.0} and read_embeddings(tmp_path, latest=False).num_rows == 3
    with pytest.raises(pa.ArrowInvalid):
        write_shard([_row("c", t0, 1.0, c=5)], tmp_path / "bad.parquet", schema)  # wrong embedding size
    assert shard_files(tmp_path) == [tmp_path / "s1.parquet", tmp_path / "s2.parquet"]  # nothing half-written
    with pytest.raises(InputError, match="no embedding shards"):
        read_embeddings(tmp_path / "none")


@pytest.mark.ray
@pytest.mark.slow
def test_a_scan_without_a_tumor_is_read_once_and_never_shown(ray_head, tmp_path, small_cohort, model_file,
                                                              secret_file):
    """A folder of scans without masks where the model finds nothing (an untrained segmentation head):
    each scan gets one marker row, the next night reads none of them again, readers see no row."""
    folder = tmp_path / "incoming"
    folder.mkdir()
    for rows in list(read_manifest(small_cohort).scans().values())[:2]:
        shutil.copy(rows[0].image, folder / f"{rows[0].scan_id}.nii.gz")
    path, _ = model_file
    kw = dict(manifest=folder, model_path=path, out_dir=tmp_path / "emb", secret_file=secret_file, workers=1,
              log=lambda *_: None)
    first = run_embedding(**kw)
    assert (first["embedded"], first["tumors_embedded"], first["failed"]) == (2, 0, 0)
    marks = pq.read_table(shard_files(tmp_path / "emb")[0]).to_pylist()
    assert sorted(r["scan_key"] for r in marks) == sorted(keyed_id(p.name[:-7], SECRET) for p in folder.iterdir())
    assert all(r["source"] == "none" and r["tumor_id"] == 0 and r["embedding"] is None for r in marks)
    assert read_embeddings(tmp_path / "emb").num_rows == 0  # readers never see a marker
    again = run_embedding(**kw)
    assert (again["embedded"], again["unchanged"]) == (0, 2)


def test_one_writer_at_a_time(tmp_path, small_cohort, model_file, secret_file):
    """While an embedding holds the archive folder, a second embedding or a compaction stops with an
    error naming the folder and the holder, before writing anything; the lock goes with its holder."""
    out = tmp_path / "emb"
    out.mkdir()
    (out / "old.parquet").write_bytes(b"")  # a shard, as far as the first check of compaction goes
    path, _ = model_file
    with folder_lock(out, "embed"):
        with pytest.raises(InputError, match=r"emb: embed \(pid \d+, since .* UTC\) is writing this folder; this "
                                             r"compact stops without writing"):
            compact_shards(out)
        with pytest.raises(InputError, match=r"is writing this folder; this embed stops without writing"):
            run_embedding(manifest=small_cohort, model_path=path, out_dir=out, secret_file=secret_file,
                          log=lambda *_: None)
    assert sorted(p.name for p in out.iterdir()) == [".lock", "old.parquet"]  # nothing written
    assert (out / ".lock").read_text() == ""
    with folder_lock(out, "compact"):  # free again
        assert "compact (pid" in (out / ".lock").read_text()


def test_rows_are_rewritten_without_a_forward_pass_only_for_the_same_tumors():
    one = stored_rows("p1", [(1, (0, 1), {}), (2, (1, 1), {"info_outcome": "x"})], masked=True)
    relabeled = stored_rows("p2", [(2, (1, 0), {}), (1, (0, 1), {"info_outcome": "y"})], masked=True)
    assert one != relabeled and same_tumors(one, relabeled)  # labels, case information, patient: rewritten
    assert not same_tumors(one, stored_rows("p1", [(1, (0, 1), {})], masked=True))  # a tumor less: embedded
    found = stored_rows("p1", [(0, (), {"info_outcome": "x"})], masked=False)
    assert found == stored_rows("p1", [(3, (-1, -1), {"info_outcome": "x"})], masked=False)  # the row's info only
    assert same_tumors(found, stored_rows("p9", [(0, (), {})], masked=False))
    assert not same_tumors(found, one)  # a mask added: embedded


def test_secret_file_errors(tmp_path):
    with pytest.raises(InputError, match="secret file not found"):
        read_secret(tmp_path / "missing.key")
    (tmp_path / "short.key").write_text("abc\n")
    with pytest.raises(InputError, match=r"short\.key: the secret is 3 bytes; at least 16"):
        read_secret(tmp_path / "short.key")


@pytest.mark.ray
@pytest.mark.slow
def test_embedding_job_is_incremental_and_records_failures(ray_head, tmp_path, small_cohort, model_file, secret_file):
    archive = tmp_path / "archive"
    shutil.copytree(small_cohort.parent, archive)
    manifest = archive / small_cohort.name
    cohort = read_manifest(manifest)
    n_tumors = sum(len(r) for r in cohort.scans().values())
    out = tmp_path / "emb"
    path, mid = model_file
    kw = dict(manifest=manifest, model_path=path, out_dir=out, secret_file=secret_file, workers=2,
              scans_per_shard=8, log=lambda *_: None)

    first = run_embedding(**kw)
    assert (first["embedded"], first["unchanged"], first["failed"]) == (len(cohort.scans()), 0, 0)
    assert first["tumors_embedded"] == n_tumors and len(shard_files(out)) == -(-len(cohort.scans()) // 8)
    table = read_embeddings(out, model_id=mid)
    assert table.num_rows == n_tumors and table.schema.field("embedding").type == pa.list_(pa.float32(), 8)
    # the same numbers as embedding one scan directly
    scan_id = sorted(cohort.scans())[0]
    direct = embed_scan(_model(), mid, cohort.scans()[scan_id], spacing_mm=4.0, patch_size=16, secret=SECRET)
    rows = [r for r in table.to_pylist() if r["scan_key"] == keyed_id(scan_id, SECRET)]
    assert len(rows) == len(direct)
    assert np.allclose(rows[0]["embedding"], direct[0]["embedding"], atol=1e-5)
    # no raw patient or scan id in any output file
    ids = {i for rs in cohort.scans().values() for r in rs for i in (r.patient_id, r.scan_id)}
    blob = b"".join(p.read_bytes() for p in out.iterdir())
    assert not any(i.encode() in blob for i in ids)

    # the nightly re-run: nothing changed, nothing embedded again
    again = run_embedding(**kw)
    assert (again["embedded"], again["unchanged"], again["failed"]) == (0, len(cohort.scans()), 0)
    assert len(shard_files(out)) == -(-len(cohort.scans()) // 8)
    # the same weights with other embedding settings (here the patch size): every scan again, and
    # the next run with those settings embeds nothing
    other = run_embedding(**kw, patch_size=24)
    assert (other["embedded"], other["unchanged"]) == (len(cohort.scans()), 0)
    assert run_embedding(**kw, patch_size=24)["unchanged"] == len(cohort.scans())
    assert read_embeddings(out, model_id=mid).num_rows == n_tumors  # the newest rows only
    run_embedding(**kw)  # back to the model's own settings for what follows

    # the manifest corrected, the files not: a label changed, a scan moved to another patient -> those two
    # scans' rows written again from the stored ones (the same vectors, the manifest's labels and patient
    # now; no forward pass), nothing else
    table_rows = list(csv.DictReader(manifest.open()))
    scans = sorted(cohort.scans())
    relabel, move = scans[3], scans[4]
    old_type = next(r["tumor_type"] for r in table_rows if r["scan_id"] == relabel)
    new_type = next(t for t in DEFAULT_SCHEMA["tumor_type"].classes if t != old_type)
    other_patient = next(r["patient_id"] for r in table_rows if r["scan_id"] not in (relabel, move))
    for r in table_rows:
        if r["scan_id"] == relabel:
            r["tumor_type"] = new_type
        if r["scan_id"] == move:
            r["patient_id"] = other_patient
    with manifest.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(table_rows[0]))
        w.writeheader()
        w.writerows(table_rows)
    before = {(r["scan_key"], r["tumor_id"]): r["embedding"] for r in read_embeddings(out, model_id=mid).to_pylist()}
    fixed = run_embedding(**kw)
    assert (fixed["embedded"], fixed["relabeled"], fixed["unchanged"], fixed["rows_changed"]) == (
        0, 2, len(scans) - 2, 2)
    latest = read_embeddings(out, model_id=mid).to_pylist()
    assert len(latest) == n_tumors
    new_index = DEFAULT_SCHEMA["tumor_type"].index(new_type)
    assert {r["label_tumor_type"] for r in latest if r["scan_key"] == keyed_id(relabel, SECRET)} == {new_index}
    assert {r["patient_key"] for r in latest if r["scan_key"] == keyed_id(move, SECRET)} == {
        patient_key(other_patient, SECRET)}
    assert all(np.allclose(before[(r["scan_key"], r["tumor_id"])], r["embedding"], atol=1e-5) for r in latest)
    assert run_embedding(**kw)["unchanged"] == len(scans)  # and the next night nothing

    # case information: an info_* column added, one tumor's outcome recorded -> that scan's rows alone
    # written again; they carry it, search shows it beside the hit, and the other rows have none
    told = scans[5]
    for r in table_rows:
        r["info_outcome"] = "local control at 12 months" if r["scan_id"] == told else ""
    with manifest.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(table_rows[0]))
        w.writeheader()
        w.writerows(table_rows)
    noted = run_embedding(**kw)
    assert (noted["embedded"], noted["relabeled"], noted["rows_changed"]) == (0, 1, 1)
    latest = read_embeddings(out, model_id=mid).to_pylist()
    carried = {r["scan_key"] for r in latest if r["info_outcome"] == "local control at 12 months"}
    assert carried == {keyed_id(told, SECRET)} and sum(r["info_outcome"] is None for r in latest) == len(latest) - len(
        [r for r in table_rows if r["scan_id"] == told])
    query = next(r for r in latest if r["patient_key"] != latest[[x["scan_key"] for x in latest].index(
        keyed_id(told, SECRET))]["patient_key"])
    (res,) = search_archived(path, out, f"{query['scan_key']}:{query['tumor_id']}", k=len(latest))
    told_hits = [h for h in res["hits"] if h["scan_key"] == keyed_id(told, SECRET)]
    assert told_hits and all(h["info"] == {"outcome": "local control at 12 months"} for h in told_hits)
    assert all(h["info"] == {} for h in res["hits"] if h["scan_key"] != keyed_id(told, SECRET))
    assert "| outcome |" in format_search([res]) and "local control at 12 months |" in format_search([res])
    n_told = len(told_hits)  # how the retrieved tumors went, counted below the table
    assert res["among_hits"]["outcome"] == {"(not recorded)": len(res["hits"]) - n_told,
                                            "local control at 12 months": n_told}
    assert (f"outcome (not recorded) {len(res['hits']) - n_told}, local control at 12 months {n_told}"
            in format_search([res]))
    (only,) = search_archived(path, out, f"{query['scan_key']}:{query['tumor_id']}", k=len(latest),
                              where=["info_outcome=Local control at 12 months"])
    assert sorted(h["scan_key"] for h in only["hits"]) == sorted(h["scan_key"] for h in told_hits)
    assert run_embedding(**kw)["unchanged"] == len(scans)

    # one scan's image is corrupted, another's replaced: the first is recorded, the second re-embedded
    scans = sorted(cohort.scans())
    bad, changed = cohort.scans()[scans[0]][0], cohort.scans()[scans[1]][0]
    bad.image.write_bytes(b"not a nifti")
    img = nib.load(changed.image)
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj) * 1.5, img.affine, img.header), changed.image)
    missing = cohort.scans()[scans[2]][0]
    missing.mask.unlink()  # a file gone from the archive: that scan fails, the job goes on
    third = run_embedding(**kw)
    assert (third["embedded"], third["unchanged"], third["failed"]) == (1, len(cohort.scans()) - 3, 2)
    errors = sorted((json.loads(x) for x in (out / "embed-errors.jsonl").read_text().splitlines()),
                    key=lambda e: e["row"])
    assert [e["scan_key"] for e in errors] == [keyed_id(s, SECRET) for s in (scans[0], scans[2])]
    assert all(list(e) == ["run", "row", "scan_key", "stage", "error_class", "message"] for e in errors)
    assert errors[0]["row"] == cohort.scans()[scans[0]][0].row and errors[0]["stage"] == "read"
    assert errors[0]["error_class"] == "not_nifti" and errors[0]["message"].startswith("<image>: not a readable NIfTI")
    assert errors[1]["error_class"] == "missing_file" and errors[1]["message"] == "<mask>: file not found"
    assert str(archive) not in json.dumps(errors)
    history = json.loads((out / "embed-report.json").read_text())
    assert [r["failed"] for r in history["runs"]] == [0, 0, 0, 0, 0, 0, 0, 0, 0, 2] and history["last"] == third
    latest = read_embeddings(out, model_id=mid)
    assert latest.num_rows == n_tumors  # the re-embedded scan's old rows are superseded; failed scans keep theirs
    hashes = zip(latest["scan_key"].to_pylist(), latest["source_hash"].to_pylist(), strict=True)
    assert len({h for s, h in hashes if s == keyed_id(scans[1], SECRET)}) == 1


def test_embed_command_names_bad_input(tmp_path, small_cohort, model_file, secret_file, capsys):
    from ray_job import main

    path, _ = model_file
    base = ["embed", "--manifest", str(small_cohort), "--out", str(tmp_path / "o")]
    assert main([*base, "--model", str(tmp_path / "none.pt"), "--secret-file", str(secret_file)]) == 2
    assert "none.pt: model file not found" in capsys.readouterr().err
    assert main([*base, "--model", str(path), "--secret-file", str(tmp_path / "no.key")]) == 2
    assert "no.key: secret file not found" in capsys.readouterr().err
    assert main([*base, "--model", str(path), "--secret-file", str(secret_file), "--workers", "0"]) == 2
    assert "workers, threads_per_worker and scans_per_shard must be >= 1" in capsys.readouterr().err
    for detector in (["--detector", str(tmp_path / "det.pt")], ["--set", f"embed.detector={tmp_path / 'det.pt'}"]):
        assert main([*base, "--model", str(path), "--secret-file", str(secret_file), *detector]) == 2
        assert "det.pt: model file not found" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # refused before anything is written


def test_shard_embedder_actor_without_ray(tmp_path, small_cohort, model_file):
    """The two stages' calls, as Ray Data makes them: settings and rows travel in the item, the read
    scans' arrays between the stages, no constructor arguments; a scan that cannot be read fails in
    the CPU stage and the other scans are embedded."""
    import dataclasses

    from embedder.job import ShardEmbedder, _row_dict, decode_shard
    from tumornet.detect import DetectConfig
    from tumornet.recipe import RetrievalConfig

    path, mid = model_file
    scans = read_manifest(small_cohort).scans()
    ids = sorted(scans)[:3]
    job = {"model_path": str(path), "out_dir": str(tmp_path / "o"), "secret": SECRET.hex(), "spacing_mm": 4.0,
           "patch_size": 16, "recipe": dataclasses.asdict(RetrievalConfig()), "stats": None, "threads": 1,
           "stamp": "t", "detect": dataclasses.asdict(DetectConfig()), "gpus": 0, "precision": "fp32",
           "settings": "s"}
    rows = {s: [_row_dict(r) for r in scans[s]] for s in ids}
    rows[ids[2]] = [dict(r, image=str(tmp_path / "gone.nii.gz")) for r in rows[ids[2]]]
    item = {"job": job, "scans": [{"scan_key": keyed_id(s, SECRET), "done": [], "rows": rows[s]} for s in ids]}
    decoded = decode_shard({"shard": 3, "payload": json.dumps(item)})
    assert isinstance(decoded["arrays"], bytes) and decoded["shard"] == 3
    out = ShardEmbedder()({k: np.array([v], dtype=object) for k, v in decoded.items()})
    assert list(out["status"]) == ["embedded", "embedded", "failed"]
    assert list(out["row"]) == [scans[s][0].row for s in ids]
    assert (out["stage"][2], out["error_class"][2]) == ("read", "missing_file") and "gone" not in out["message"][2]
    (shard,) = shard_files(tmp_path / "o")
    assert shard.name == f"{mid}-t-00003.parquet"
    table = pq.read_table(shard)
    assert table.num_rows == sum(len(scans[s]) for s in ids[:2]) == int(out["tumors"].sum())
    direct = [r for s in ids[:2] for r in embed_scan(load_model(path)[0], mid, scans[s], spacing_mm=4.0, patch_size=16,
                                                       secret=SECRET)]
    np.testing.assert_allclose(np.stack(table["embedding"].to_numpy(zero_copy_only=False)),
                               np.array([r["embedding"] for r in direct]), rtol=1e-5, atol=1e-6)


def test_reduced_precision_is_for_gpus_only():
    from embedder.job import inference_precision
    from tumornet.config import check_precision

    check_precision(False, "fp32")
    check_precision(True, "bf16")
    with pytest.raises(InputError, match="reduced precision is for GPU embedding only"):
        check_precision(False, "bf16")
    with pytest.raises(InputError, match="expected fp32, bf16 or fp16"):
        check_precision(True, "fp8")
    with pytest.raises(InputError, match="GPU embedding only"):
        inference_precision("cpu", "fp16")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_embedding_matches_cpu(small_cohort, model_file):
    """The actor's GPU path: the same rows as on CPU in fp32, close in bf16; detection runs on CUDA."""
    from embedder.embed import embed_read, read_scan
    from embedder.job import inference_precision

    path, mid = model_file
    rows = next(iter(read_manifest(small_cohort).scans().values()))
    read = read_scan(rows, spacing_mm=4.0)
    cpu_model = load_model(path)[0]
    gpu_model = load_model(path)[0].to("cuda")
    kw = {"spacing_mm": 4.0, "patch_size": 16, "secret": SECRET, "file_hash": ""}
    cpu = embed_read(cpu_model, mid, rows, read, **kw)
    gpu = embed_read(gpu_model, mid, rows, read, **kw)
    for a, b in zip(cpu, gpu, strict=True):
        np.testing.assert_allclose(a["embedding"], b["embedding"], rtol=1e-3, atol=1e-4)
    with inference_precision(gpu_model.device, "bf16"):
        half = embed_read(gpu_model, mid, rows, read, **kw)
    for a, b in zip(cpu, half, strict=True):
        assert np.linalg.norm(np.subtract(a["roipool"], b["roipool"])) <= 0.05 * np.linalg.norm(a["roipool"]) + 1e-3
    unmasked = [dataclasses.replace(rows[0], mask=None, tumor_id=0, labels={})]
    found = embed_read(gpu_model, mid, unmasked, read_scan(unmasked, spacing_mm=4.0), **kw)
    assert all(r["source"] == "predicted" for r in found)
