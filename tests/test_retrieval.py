"""KNN evaluation: hand-computed neighbours and scores, missing labels, other patients only, the split
taken from the model, the handcrafted baseline; search; robustness; command errors."""

import datetime
import json
import math
import re

import numpy as np
import pytest

from conftest import SECRET, model_with_split
from embedder.shards import shard_schema, write_shard
from retrieval.evaluate import evaluate, format_evaluation, write_evaluation
from retrieval.knn import Split, knn_scores, no_embedding, standardize
from tumornet.errors import InputError
from tumornet.export import export_model
from tumornet.keys import keyed_id
from tumornet.labels import DEFAULT_SCHEMA, MISSING
from tumornet.manifest import read_manifest
from tumornet.network import MultitaskNet, NetConfig
from tumornet.split import split_scan_ids


def test_knn_scores_by_hand():
    # database on a line: x = 0, 1, 2, 10, 11; labels a a b b b; sizes 10 20 30 40 50
    train = Split(x=np.array([[0.0], [1.0], [2.0], [10.0], [11.0]]),
                  labels={"t": np.array([0, 0, 1, 1, 1])}, size_mm=np.array([10.0, 20.0, 30.0, 40.0, 50.0]))
    test = Split(x=np.array([[0.4], [9.0]]), labels={"t": np.array([0, 0])}, size_mm=np.array([15.0, 45.0]))
    s = knn_scores(train, test, [1, 3, 5], ["t"])
    # K=1: neighbours 0 -> a (right), 10 -> b (wrong); K=3: {0,1,2} -> a; {10,11,2} -> b
    assert s[1]["acc_t"] == 0.5 and s[3]["acc_t"] == 0.5
    assert s[1]["rmse_size_mm"] == pytest.approx(math.sqrt(((10 - 15) ** 2 + (40 - 45) ** 2) / 2))
    assert s[3]["rmse_size_mm"] == pytest.approx(math.sqrt(((20 - 15) ** 2 + (40 - 45) ** 2) / 2))
    assert s[5]["acc_t"] == 0.0  # majority b everywhere
    # precision@3: query 1 -> a a b = 2/3; query 2 -> b b b = 0 => 1/3
    assert s[3]["precision_t"] == pytest.approx((2 / 3 + 0) / 2)
    # AP@3 (R = 2 relevant a's): query 1 ranks a, a, b: (1/1 + 2/2) / 2 = 1; query 2 ranks b, b, b: 0
    assert s[3]["map_t"] == pytest.approx(0.5)
    # AP@5 of query 2: ranks 10, 11, 2, 1, 0 -> b b b a a: P@4 = 1/4, P@5 = 2/5 -> (1/4 + 2/5) / 2
    assert s[5]["map_t"] == pytest.approx((1.0 + (1 / 4 + 2 / 5) / 2) / 2)
    b = no_embedding(train, test, ["t"])
    assert b["acc_t"] == 0.0 and b["rmse_size_mm"] == pytest.approx(math.sqrt(((30 - 15) ** 2 + (30 - 45) ** 2) / 2))
    assert b["precision_t"] == pytest.approx(2 / 5) == b["map_t"]  # random retrieval: the frequency of class a


def test_the_oracle_takes_shared_labels_first_then_the_nearest_size():
    from retrieval.knn import oracle

    # database: labels (t, u) and sizes; the query is (0, 0) at 20 mm
    db = Split(x=np.zeros((5, 1)), labels={"t": np.array([0, 0, 1, 0, 0]), "u": np.array([0, 0, 0, 1, MISSING])},
               size_mm=np.array([10.0, 26.0, 20.0, 20.0, 21.0]))
    q = Split(x=np.zeros((1, 1)), labels={"t": np.array([0]), "u": np.array([0])}, size_mm=np.array([20.0]))
    odb, oq = oracle(db, q, ["t", "u"])
    d2 = ((odb.x - oq.x) ** 2).sum(1)
    # squared distance: label_mm^2 per disagreeing task (half of it for a missing label) + size difference^2
    assert d2 == pytest.approx([100.0, 36.0, 1e4, 1e4, 5e3 + 1.0])
    s = knn_scores(odb, oq, [1, 2], ["t", "u"])
    assert s[1]["rmse_size_mm"] == pytest.approx(6.0)  # the 26 mm tumor shares both labels: it beats 20 mm ones
    assert s[2]["rmse_size_mm"] == pytest.approx(2.0) and s[2]["acc_t"] == 1.0 == s[2]["acc_u"]  # (26 + 10) / 2 = 18
    # a small label weight trades labels for size: a label is worth 3 mm here, so the 21 mm tumor whose
    # u is unknown (4.5 + 1) and the 20 mm ones with one label off (9) come before the 26 mm one (36)
    odb3, oq3 = oracle(db, q, ["t", "u"], label_mm=3.0)
    assert ((odb3.x - oq3.x) ** 2).sum(1) == pytest.approx([100.0, 36.0, 9.0, 9.0, 5.5])
    assert knn_scores(odb3, oq3, [1], ["t", "u"])[1]["rmse_size_mm"] == pytest.approx(1.0)


def test_missing_labels_neither_vote_nor_count():
    train = Split(x=np.array([[0.0], [0.1], [5.0]]), labels={"t": np.array([MISSING, 1, 0])},
                  size_mm=np.ones(3))
    test = Split(x=np.array([[0.0], [0.0]]), labels={"t": np.array([1, MISSING])}, size_mm=np.ones(2))
    s = knn_scores(train, test, [1], ["t"])
    assert s[1]["acc_t"] == 1.0  # the nearest labelled neighbour votes; the unlabelled query is not scored
    nothing = Split(x=train.x, labels={"t": np.full(3, MISSING)}, size_mm=np.ones(3))
    assert math.isnan(knn_scores(nothing, test, [1], ["t"])[1]["acc_t"])
    with pytest.raises(InputError, match="Split: embeddings"):
        Split(x=np.zeros((2, 3)), labels={"t": np.zeros(3)}, size_mm=np.zeros(2))


def test_a_neighbour_from_the_query_patient_never_counts():
    # patient A has a baseline and a follow-up scan in the same set: the follow-up is a near copy
    db = Split(x=np.array([[0.0], [0.05], [3.0], [4.0]]), labels={"t": np.array([1, 1, 0, 0])},
               size_mm=np.array([10.0, 10.0, 30.0, 30.0]), patients=np.array(["A", "A", "B", "C"]))
    q = db.subset(np.array([0]))
    s = knn_scores(db, q, [1, 2], ["t"])
    assert s[1]["acc_t"] == 0.0 and s[1]["rmse_size_mm"] == pytest.approx(20.0)  # nearest other patient: B
    assert s[2]["precision_t"] == 0.0 and s[2]["map_t"] == 0.0  # no relevant tumor from another patient
    without = knn_scores(db.with_x(db.x), Split(x=q.x, labels=q.labels, size_mm=q.size_mm), [1], ["t"])
    assert without[1]["acc_t"] == 1.0  # what it would be if the own patient counted (itself at distance 0)


def test_standardize_uses_the_database_statistics():
    db = Split(x=np.array([[0.0, 5.0], [2.0, 5.0]]), labels={}, size_mm=np.zeros(2))
    q = Split(x=np.array([[4.0, 7.0]]), labels={}, size_mm=np.zeros(1))
    zdb, zq = standardize(db, q)
    assert np.allclose(zdb.x[:, 0], [-1, 1]) and np.allclose(zq.x, [[3.0, 2.0]])  # constant column: sd 1


def _shard_rows(cohort, rng):
    """Shard rows whose embedding encodes the tumor type (class 0 also for unknown); handcrafted noise."""
    rows, at = [], datetime.datetime(2026, 11, 1, tzinfo=datetime.UTC)
    for r in cohort.rows:
        tt = r.labels["tumor_type"]
        emb = np.zeros(4, dtype=np.float32)
        emb[max(tt, 0)] = 5.0
        emb += rng.normal(0, 0.1, 4).astype(np.float32)
        rows.append({"scan_key": keyed_id(r.scan_id, SECRET), "patient_key": keyed_id(r.patient_id, SECRET),
                     "tumor_id": r.tumor_id, "source": "mask", "bbox": [0] * 6, "bbox_mm": [0.0] * 6,
                     "centroid_mm": [0.0] * 3, "volume_ml": 1.0, "size_mm": 10.0 + 10 * max(tt, 0),
                     **{f"label_{t}": r.labels.get(t, -1) for t in DEFAULT_SCHEMA.names},
                     **{f"pred_{t}": 0 for t in DEFAULT_SCHEMA.names},
                     "embedding": emb.tolist(), "handcrafted": rng.normal(0, 1, 8).tolist(), "model_id": "m",
                     "source_hash": "h", "embedded_at": at})
    return rows


def test_evaluation_takes_the_split_from_the_model(tmp_path, small_cohort):
    cohort = read_manifest(small_cohort)
    _, mid = model_with_split(tmp_path / "model.pt", cohort, seed=7, test_fraction=0.25)
    rows = [dict(r, model_id=mid) for r in _shard_rows(cohort, np.random.default_rng(0))]
    write_shard(rows, tmp_path / "emb" / "s.parquet", shard_schema(4, DEFAULT_SCHEMA.names))
    res = evaluate(tmp_path / "emb", small_cohort, SECRET, tmp_path / "model.pt", k=5, ks=[1, 5])
    # the held-out tumors are those of the model's split (seed 7), with no seed passed again
    *_, test7 = split_scan_ids(cohort, test_fraction=0.25, seed=7)
    *_, test0 = split_scan_ids(cohort, test_fraction=0.25, seed=0)
    assert set(test7) != set(test0)
    held_out = sum(1 for r in cohort.rows if r.scan_id in set(test7))
    assert res["test_tumors"] == held_out and res["train_tumors"] == len(cohort.rows) - held_out
    assert res["split"]["seed"] == 7 and res["split"]["test_fraction"] == 0.25
    learned, hand, none, best = (res["rows"][r] for r in ("learned", "handcrafted", "no_embedding", "oracle"))
    assert learned["acc_tumor_type"] == 1.0 > none["acc_tumor_type"]
    # the oracle (true labels, most shared first) beats noise vectors on every task and on size
    assert all(best[f"acc_{t}"] > hand[f"acc_{t}"] for t in res["tasks"])
    assert best["rmse_size_mm"] < hand["rmse_size_mm"]
    # AP@5 divides by min(5, R): a rare type with fewer than 5 training tumors still scores 1; precision does not
    assert learned["map_tumor_type"] == 1.0 and 0.9 < learned["precision_tumor_type"] <= 1.0
    assert hand["acc_tumor_type"] < 1.0  # noise vectors
    assert res["k_curve"]["learned"]["1"]["rmse_size_mm"] < 1e-9  # same type, same size
    assert learned["rmse_size_mm"] < none["rmse_size_mm"]
    text = format_evaluation(res)
    assert "| tumor_type accuracy | 100.0 % |" in text and "| tumor_type mAP@5 | 100.0 % |" in text
    assert "| oracle (true labels, then size) |" in text
    write_evaluation(res, tmp_path / "e.json")
    assert "NaN" not in (tmp_path / "e.json").read_text()
    with pytest.raises(InputError, match="0 training and 0 held-out tumors match"):
        evaluate(tmp_path / "emb", small_cohort, b"another-site-key-0000", tmp_path / "model.pt")
    # a manifest with patients the model never saw is refused
    other = tmp_path / "other.csv"
    other.write_text(re.sub(r"^SYN", "NEW", small_cohort.read_text(), flags=re.M))  # other patient ids
    with pytest.raises(InputError, match="are in neither split of the model"):
        evaluate(tmp_path / "emb", other, SECRET, tmp_path / "model.pt")
    # a model without a recorded split is refused
    export_model(MultitaskNet(NetConfig(channels=4, blocks=1), DEFAULT_SCHEMA), tmp_path / "old.pt")
    with pytest.raises(InputError, match="records no training split"):
        evaluate(tmp_path / "emb", small_cohort, SECRET, tmp_path / "old.pt")


def test_search_finds_the_query_itself_first(archive, small_cohort, tmp_path):
    import nibabel as nib

    from retrieval.search import format_search, query_rows, search

    cohort = read_manifest(small_cohort)
    scan = next(s for s in cohort.scans().values() if len(s) > 1)
    res = search(archive / "model.pt", archive / "emb", query_rows(scan[0].image, scan[0].mask), k=3)
    assert [q["tumor_id"] for q in res] == sorted(r.tumor_id for r in scan)
    for q in res:
        top = q["hits"][0]
        assert top["scan_key"] == keyed_id(scan[0].scan_id, SECRET) and top["tumor_id"] == q["tumor_id"]
        assert top["distance"] < 1e-4 and [h["rank"] for h in q["hits"]] == [1, 2, 3]
        assert q["hits"][1]["distance"] >= top["distance"]
    assert "| 1 | 0.000 |" in format_search(res)
    # a binary mask: each connected component is a tumor
    m = nib.load(scan[0].mask)
    nib.save(nib.Nifti1Image((np.asarray(m.dataobj) > 0).astype(np.uint8), m.affine), tmp_path / "bin.nii.gz")
    assert len(query_rows(scan[0].image, tmp_path / "bin.nii.gz", binary=True)) == len(scan)
    with pytest.raises(InputError, match=r"no tumor \[99\] in the mask"):
        query_rows(scan[0].image, scan[0].mask, tumor_ids=[99])
    with pytest.raises(InputError, match="no tumor embedded with model"):
        other = tmp_path / "other.pt"
        export_model(MultitaskNet(NetConfig(channels=8, blocks=1), DEFAULT_SCHEMA), other,
                     extra={"spacing_mm": [4.0] * 3, "patch_size": 16})
        search(other, archive / "emb", query_rows(scan[0].image, scan[0].mask))


def test_robustness_without_distortion_equals_the_clean_scores(archive, small_cohort):
    from retrieval.robustness import format_robustness, robustness

    same = robustness(archive / "model.pt", archive / "emb", small_cohort, SECRET, k=3, draws=1,
                      log2_scale_sd=0.0, shift_sd=0.0)
    assert same["distorted_mean"] == pytest.approx(same["clean"], nan_ok=True)
    assert all(v == 0 or math.isnan(v) for v in same["distorted_sd"].values())
    res = robustness(archive / "model.pt", archive / "emb", small_cohort, SECRET, k=3, draws=2)
    assert res["draws"] == 2 and set(res["distorted_mean"]) == set(res["clean"])
    assert 0 <= res["distorted_mean"]["acc_tumor_type"] <= 1 and res["distorted_mean"]["rmse_size_mm"] > 0
    assert "| size RMSE (mm) |" in format_robustness(res)
    with pytest.raises(InputError, match="--draws: expected >= 1, got 0"):
        robustness(archive / "model.pt", archive / "emb", small_cohort, SECRET, draws=0)


def test_robustness_refuses_a_drawn_size_regression_the_model_file_lacks(archive, small_cohort, tmp_path):
    from retrieval.robustness import robustness
    from tumornet.export import with_search_settings

    lacking = tmp_path / "fit.pt"  # the recipe says drawn_read: fit; the file carries no regression
    with_search_settings(archive / "model.pt", lacking, ["retrieval.drawn_read=fit", "retrieval.drawn_size=1"])
    with pytest.raises(InputError, match=r"fit\.pt: retrieval\.drawn_read: fit needs the drawn-box size regression"):
        robustness(lacking, archive / "emb", small_cohort, SECRET, k=3, draws=1)


def test_evaluate_and_search_commands_name_bad_input(tmp_path, archive, small_cohort, capsys):
    from ray_job import main

    key = tmp_path / "site.key"
    key.write_bytes(SECRET)
    base = ["evaluate", "--embeddings", str(archive / "emb"), "--manifest", str(small_cohort),
            "--secret-file", str(key), "--model", str(archive / "model.pt")]
    assert main([*base, "--robustness", "--draws", "0"]) == 2
    assert "--draws: expected >= 1, got 0" in capsys.readouterr().err
    assert main([*base, "--k", "0"]) == 2
    assert "K must be >= 1" in capsys.readouterr().err
    assert main([*base, "--ks", "1,x"]) == 2
    assert "--ks: expected comma-separated integers" in capsys.readouterr().err
    assert main([*base, "--rerank", "-1"]) == 2
    assert "--rerank: retrieval.rerank: expected a whole number >= 0" in capsys.readouterr().err
    assert main([*base, "--oracle-frontier", "2,x"]) == 2
    assert "--oracle-frontier: expected comma-separated numbers" in capsys.readouterr().err
    assert main([*base, "--oracle-frontier", "0"]) == 2
    assert "each label weight must be > 0 mm, got 0" in capsys.readouterr().err
    assert main([*base, "--out", str(tmp_path / "e.json"), "--oracle-frontier", "0.001,100"]) == 0
    out = capsys.readouterr().out
    assert "KNN evaluation of model" in out and "| 100 mm |" in out and (tmp_path / "e.json").is_file()
    frontier = json.loads((tmp_path / "e.json").read_text())["oracle_frontier"]
    # a label worth nothing: the neighbours are the nearest in size alone; worth 100 mm: the oracle row itself
    assert frontier["0.001"]["rmse_size_mm"] <= frontier["100"]["rmse_size_mm"]
    assert frontier["100"] == json.loads((tmp_path / "e.json").read_text())["rows"]["oracle"]
    assert main(["search", "--model", str(archive / "model.pt"), "--embeddings", str(archive / "emb"),
                 "--image", str(tmp_path / "none.nii.gz"), "--mask", str(tmp_path / "none.nii.gz")]) == 2
    assert "none.nii.gz: file not found" in capsys.readouterr().err


def test_search_by_box_by_archived_tumor_and_with_label_filters(archive, small_cohort):
    from embedder.shards import read_embeddings
    from retrieval.search import format_search, search_archived, search_box

    cohort = read_manifest(small_cohort)
    scan = next(s for s in cohort.scans().values() if len(s) > 1)
    table = read_embeddings(archive / "emb")
    key = keyed_id(scan[0].scan_id, SECRET)
    row = next(r for r in table.to_pylist() if r["scan_key"] == key)
    # the paper's query: the tumor's own box in mm gives the archive's vector of that tumor
    (q,) = search_box(archive / "model.pt", archive / "emb", scan[0].image, row["bbox_mm"], k=3)
    assert q["hits"][0]["scan_key"] == key and q["hits"][0]["tumor_id"] == row["tumor_id"]
    assert q["hits"][0]["distance"] < 1e-3 and q["size_mm"] is None and "query box" in format_search([q])
    # the size the box was read as: the equivalent diameter of its inscribed ellipsoid (drawn_size 0: the box's)
    assert q["box_read_mm"] == pytest.approx(np.cbrt(np.prod(np.subtract(row["bbox_mm"][3:], row["bbox_mm"][:3]))))
    assert f"read as a tumor about {q['box_read_mm']:.1f} mm across" in format_search([q])
    # a box drawn 20 % too large reads as its own size, pooled over the voxels that cover it (one more a side)
    from retrieval.search import drawn_box_example, drawn_box_parts
    from tumornet.boxes import box_mm_to_voxels, box_size, box_to_mm, grown_box_mm
    from tumornet.descriptor import tumor_parts
    from tumornet.export import load_model
    from tumornet.recipe import RetrievalConfig
    from tumornet.volumes import load_volume

    net = load_model(archive / "model.pt")[0]
    vol = load_volume(scan[0].image, scan_id="q", spacing_mm=4.0)
    bmm = np.asarray(row["bbox_mm"])
    first = next(r for r in scan if r.tumor_id == row["tumor_id"])
    drawn = drawn_box_example(first, 4.0)  # the demo's box query: the mask's box, 20 % too large a side
    assert np.allclose(drawn, grown_box_mm(bmm, 0.2))
    covering = box_mm_to_voxels(drawn, vol.affine, vol.array.shape)
    parts = drawn_box_parts(net, vol, drawn, cfg=RetrievalConfig(), patch_size=16, where="q")
    same = tumor_parts(net, vol.array, covering, patch_size=16, spacing_mm=4.0)
    assert np.allclose(parts["roipool"], same["roipool"], atol=1e-5)
    assert parts["box_log_volume"] == pytest.approx(np.log(np.prod(bmm[3:] - bmm[:3]) * 1.2 ** 3 / 1000))
    # where nothing is segmented in the box, the segmented volume's fallback is the drawn box's ellipsoid too
    def ellipsoid(voxels):
        return np.log(max(round(np.pi / 6 * voxels), 1) * 64 / 1000)

    fell_back = same["seg_log_volume"] == pytest.approx(ellipsoid(np.prod(box_size(covering))))
    drawn_voxels = np.prod(bmm[3:] - bmm[:3]) * 1.2 ** 3 / 64
    assert parts["seg_log_volume"] == pytest.approx(ellipsoid(drawn_voxels) if fell_back else same["seg_log_volume"])
    assert np.prod(box_size(covering)) * 64 > np.prod(bmm[3:] - bmm[:3]) * 1.2 ** 3 * 1.2  # the voxels: larger
    assert np.allclose(box_to_mm(box_mm_to_voxels(row["bbox_mm"], vol.affine), vol.affine), bmm)
    with pytest.raises(InputError, match="lies outside the scan"):
        search_box(archive / "model.pt", archive / "emb", scan[0].image, [900, 900, 900, 910, 910, 910])
    with pytest.raises(InputError, match="--box: expected"):
        search_box(archive / "model.pt", archive / "emb", scan[0].image, [0, 0, 0, -1, 5, 5])
    # an archived tumor: never its own patient
    (a,) = search_archived(archive / "model.pt", archive / "emb", f"{key}:{row['tumor_id']}", k=10)
    assert len(a["hits"]) == 10 and all(h["patient_key"] != row["patient_key"] for h in a["hits"])
    assert [h["rank"] for h in a["hits"]] == list(range(1, 11))
    (f,) = search_archived(archive / "model.pt", archive / "emb", f"{key}:{row['tumor_id']}", k=5,
                           where=["tumor_type=schwannoma"])
    assert f["hits"] and all(h["labels"]["tumor_type"] == "schwannoma" for h in f["hits"])
    with pytest.raises(InputError, match="unknown class 'glioma'"):
        search_archived(archive / "model.pt", archive / "emb", f"{key}:1", where=["tumor_type=glioma"])
    with pytest.raises(InputError, match="no such tumor"):
        search_archived(archive / "model.pt", archive / "emb", "0000:1")
    with pytest.raises(InputError, match=r"--rerank: retrieval\.rerank: expected a whole number >= 0"):
        search_archived(archive / "model.pt", archive / "emb", f"{key}:{row['tumor_id']}", rerank=-1)
    # a second stage that weighs nothing again leaves the order as it was
    (same,) = search_archived(archive / "model.pt", archive / "emb", f"{key}:{row['tumor_id']}", k=10, rerank=4)
    assert [h["scan_key"] for h in same["hits"]] == [h["scan_key"] for h in a["hits"]]


def test_a_new_scans_query_with_its_patient_key_never_returns_that_patient(archive, small_cohort, capsys):
    from embedder.shards import read_embeddings
    from ray_job import main
    from retrieval.search import query_rows, search, search_box
    from tumornet.keys import patient_key

    cohort = read_manifest(small_cohort)
    scan = next(s for s in cohort.scans().values() if len(s) > 1)
    mine = patient_key(scan[0].patient_id, SECRET)
    model, emb = archive / "model.pt", archive / "emb"
    rows = query_rows(scan[0].image, scan[0].mask)
    unknown = search(model, emb, rows, k=4)
    assert all(q["hits"][0]["patient_key"] == mine for q in unknown)  # itself first, when the patient is unknown
    known = search(model, emb, rows, k=4, patient_key=mine)
    for q, u in zip(known, unknown, strict=True):
        assert len(q["hits"]) == 4 and all(h["patient_key"] != mine for h in q["hits"])
        # the others keep their order: the nearest of another patient is the first such hit of before
        others = [h for h in u["hits"] if h["patient_key"] != mine]
        assert [h["scan_key"] for h in q["hits"][:len(others)]] == [h["scan_key"] for h in others]
        assert "patient_key" not in q  # the query's key is never echoed
    table_row = next(r for r in read_embeddings(emb).to_pylist() if r["patient_key"] == mine)
    (b,) = search_box(model, emb, rows[0].image, table_row["bbox_mm"], k=3, patient_key=mine)
    assert all(h["patient_key"] != mine for h in b["hits"])
    argv = ["search", "--model", str(model), "--embeddings", str(emb), "--image", str(scan[0].image),
            "--mask", str(scan[0].mask), "--k", "3", "--json"]
    assert main([*argv, "--patient-key", mine]) == 0
    out = capsys.readouterr().out
    assert mine not in out and '"hits"' in out
    tumor = f"{keyed_id(scan[0].scan_id, SECRET)}:1"
    assert main(["search", "--model", str(model), "--embeddings", str(emb), "--tumor", tumor,
                 "--patient-key", mine]) == 2
    assert "--patient-key is for a new scan's query" in capsys.readouterr().err
    assert main([*argv, "--detector", str(model)]) == 2  # a mask needs no detection
    assert "--detector finds the tumors of --image alone" in capsys.readouterr().err
    assert main([*argv, "--patient-key", "SYN0001"]) == 2  # a raw id by mistake: refused, never echoed
    err = capsys.readouterr().err
    assert "expected the patient's keyed id (16 hex characters" in err and "SYN0001" not in err


def test_among_hits_counts_what_the_hits_say():
    from retrieval.search import NOT_RECORDED, among_hits, format_search

    hits = [{"rank": r, "distance": 0.1 * r, "scan_key": f"{r:016x}", "tumor_id": 1, "size_mm": 12.0,
             "labels": {"tumor_type": t, "left_right": s}, "info": info}
            for r, (t, s, info) in enumerate([("metastasis", "left", {"outcome": "progression"}),
                                              ("meningioma", None, {"outcome": "local control", "dose_gy": "14"}),
                                              ("metastasis", "left", {}),
                                              ("metastasis", "right", {"outcome": "local control"})], 1)]
    said = among_hits(hits)
    assert said == {"tumor_type": {"metastasis": 3, "meningioma": 1}, "left_right": {"left": 2, "right": 1},
                    "dose_gy": {NOT_RECORDED: 3, "14": 1},
                    "outcome": {"local control": 2, NOT_RECORDED: 1, "progression": 1}}
    assert list(said["outcome"]) == ["local control", NOT_RECORDED, "progression"]  # most first, ties by name
    text = format_search([{"tumor_id": 1, "size_mm": 12.0, "predicted": {"tumor_type": "metastasis"},
                           "hits": hits, "among_hits": said}])
    assert text.endswith("among these 4: tumor_type metastasis 3, meningioma 1; left_right left 2, right 1; "
                         "dose_gy (not recorded) 3, 14 1; outcome local control 2, (not recorded) 1, progression 1")
    assert among_hits([]) == {}
