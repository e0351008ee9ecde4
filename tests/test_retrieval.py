"""KNN evaluation: hand-computed neighbours, missing labels, and the split matched through keyed ids."""

import datetime
import math

import numpy as np
import pytest

from embedder.shards import shard_schema, write_shard
from retrieval.evaluate import evaluate, format_evaluation, write_evaluation
from retrieval.knn import Split, baselines, knn_scores
from tumornet.cohort import keyed_id, read_manifest, split_scan_ids
from tumornet.config import load_config
from tumornet.errors import InputError
from tumornet.labels import DEFAULT_SCHEMA, MISSING

SECRET = b"0123456789abcdef-site-key"


def test_knn_votes_and_sizes_by_hand():
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
    b = baselines(train, test, ["t"])
    assert b["acc_t"] == 0.0 and b["rmse_size_mm"] == pytest.approx(math.sqrt(((30 - 15) ** 2 + (30 - 45) ** 2) / 2))


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


def test_evaluation_uses_the_patient_split_through_keyed_ids(tmp_path, small_cohort):
    cfg = load_config("configs/demo.yaml", ["data.test_fraction=0.25"])
    cohort = read_manifest(small_cohort)
    _, test_ids = split_scan_ids(cohort, test_fraction=0.25, seed=cfg.data.split_seed)
    rng = np.random.default_rng(0)
    rows, at = [], datetime.datetime(2026, 11, 1, tzinfo=datetime.UTC)
    for r in cohort.rows:
        tt = r.labels["tumor_type"]
        emb = np.zeros(4, dtype=np.float32)
        emb[max(tt, 0)] = 5.0  # an embedding that encodes the tumor type (class 0 also for unknown)
        emb += rng.normal(0, 0.1, 4).astype(np.float32)
        rows.append({"scan_key": keyed_id(r.scan_id, SECRET), "patient_key": "p", "tumor_id": r.tumor_id,
                     "source": "mask", "bbox": [0] * 6, "bbox_mm": [0.0] * 6, "centroid_mm": [0.0] * 3,
                     "volume_ml": 1.0, "size_mm": 10.0 + 10 * max(tt, 0),
                     **{f"label_{t}": r.labels.get(t, -1) for t in DEFAULT_SCHEMA.names},
                     **{f"pred_{t}": 0 for t in DEFAULT_SCHEMA.names},
                     "embedding": emb.tolist(), "model_id": "m", "source_hash": "h", "embedded_at": at})
    write_shard(rows, tmp_path / "emb" / "s.parquet", shard_schema(4, DEFAULT_SCHEMA.names))
    res = evaluate(tmp_path / "emb", small_cohort, SECRET, cfg, k=5, ks=[1, 5])
    held_out = sum(1 for r in cohort.rows if r.scan_id in set(test_ids))
    assert res["test_tumors"] == held_out and res["train_tumors"] == len(cohort.rows) - held_out
    assert res["knn"]["acc_tumor_type"] == 1.0 > res["baseline"]["acc_tumor_type"]
    assert res["k_curve"]["1"]["rmse_size_mm"] < 1e-9  # the nearest tumor has the same type, so the same size
    assert res["knn"]["rmse_size_mm"] < res["baseline"]["rmse_size_mm"]
    assert "| tumor_type accuracy | 100.0 % |" in format_evaluation(res)
    write_evaluation(res, tmp_path / "e.json")
    assert "NaN" not in (tmp_path / "e.json").read_text()
    with pytest.raises(InputError, match="0 training and 0 held-out tumors match"):
        evaluate(tmp_path / "emb", small_cohort, b"another-site-key-0000", cfg)


@pytest.fixture(scope="module")
def archive(tmp_path_factory, small_cohort):
    """The small cohort embedded without Ray (the job's per-scan function) with a random 8-channel model."""
    import torch

    from embedder.embed import embed_scan
    from tumornet.export import export_model
    from tumornet.network import MultitaskNet, NetConfig

    torch.manual_seed(0)
    model = MultitaskNet(NetConfig(channels=8, blocks=1), DEFAULT_SCHEMA).eval()
    root = tmp_path_factory.mktemp("archive")
    mid = export_model(model, root / "model.pt", extra={"spacing_mm": [4.0] * 3, "patch_size": 16})
    rows = [r for scan in read_manifest(small_cohort).scans().values()
            for r in embed_scan(model, mid, scan, spacing_mm=4.0, patch_size=16, secret=SECRET)]
    write_shard(rows, root / "emb" / "s.parquet", shard_schema(8, DEFAULT_SCHEMA.names))
    return root


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
        from tumornet.export import export_model
        from tumornet.network import MultitaskNet, NetConfig

        other = tmp_path / "other.pt"
        export_model(MultitaskNet(NetConfig(channels=8, blocks=1), DEFAULT_SCHEMA), other,
                     extra={"spacing_mm": [4.0] * 3, "patch_size": 16})
        search(other, archive / "emb", query_rows(scan[0].image, scan[0].mask))


def test_robustness_without_distortion_equals_the_clean_scores(archive, small_cohort):
    from retrieval.robustness import format_robustness, robustness

    cfg = load_config("configs/demo.yaml")
    same = robustness(archive / "model.pt", archive / "emb", small_cohort, SECRET, cfg, k=3, draws=1,
                      log2_scale_sd=0.0, shift_sd=0.0)
    assert same["distorted_mean"] == pytest.approx(same["clean"], nan_ok=True)
    assert all(v == 0 or math.isnan(v) for v in same["distorted_sd"].values())
    res = robustness(archive / "model.pt", archive / "emb", small_cohort, SECRET, cfg, k=3, draws=2)
    assert res["draws"] == 2 and set(res["distorted_mean"]) == set(res["clean"])
    assert 0 <= res["distorted_mean"]["acc_tumor_type"] <= 1 and res["distorted_mean"]["rmse_size_mm"] > 0
    assert "| size RMSE (mm) |" in format_robustness(res)
    with pytest.raises(InputError, match="--draws: expected >= 1, got 0"):
        robustness(archive / "model.pt", archive / "emb", small_cohort, SECRET, cfg, draws=0)


def test_evaluate_and_search_commands_name_bad_input(tmp_path, archive, small_cohort, capsys):
    from ray_job import main

    key = tmp_path / "site.key"
    key.write_bytes(SECRET)
    base = ["evaluate", "--embeddings", str(archive / "emb"), "--manifest", str(small_cohort),
            "--secret-file", str(key)]
    assert main([*base, "--robustness"]) == 2
    assert "--robustness needs --model" in capsys.readouterr().err
    assert main([*base, "--ks", "1,x"]) == 2
    assert "--ks: expected comma-separated integers" in capsys.readouterr().err
    assert main([*base, "--out", str(tmp_path / "e.json")]) == 0
    assert "KNN evaluation of model" in capsys.readouterr().out and (tmp_path / "e.json").is_file()
    assert main(["search", "--model", str(archive / "model.pt"), "--embeddings", str(archive / "emb"),
                 "--image", str(tmp_path / "none.nii.gz"), "--mask", str(tmp_path / "none.nii.gz")]) == 2
    assert "none.nii.gz: file not found" in capsys.readouterr().err
