"""Scans without a mask: sliding-window segmentation, found tumors, manifests and folders without
masks, detection quality, and search by image alone (a small network trained here on bright spheres)."""

import os

import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F

from conftest import SECRET, blob_subject, write_manifest, write_nifti
from embedder.embed import embed_scan
from embedder.shards import model_shard_schema, write_shard
from retrieval.detection import detection_quality, detection_sweep, dice_matrix
from retrieval.evaluate import shard_parts
from retrieval.search import query_rows, search
from tumornet.detect import DetectConfig, tumor_probability, window_origins
from tumornet.errors import InputError
from tumornet.export import export_model, load_model
from tumornet.labels import DEFAULT_SCHEMA
from tumornet.manifest import folder_cohort, read_manifest, read_manifest_lenient
from tumornet.network import MultitaskNet, NetConfig
from tumornet.recipe import RetrievalConfig
from tumornet.scans import load_scan
from tumornet.split import record_split, split_of_model
from tumornet.volumes import normalize_intensity

SHAPE = (40, 44, 36)
AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])


def _subject(seed: int):
    """Two or three spheres of radius 2-5 voxels (8-20 mm at 2 mm), apart, in a noisy background."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 4))
    centers = [(8 + 11 * i + int(rng.integers(-1, 2)), int(rng.integers(10, 34)), int(rng.integers(10, 26)))
               for i in range(n)]
    radii = sorted((int(r) for r in rng.integers(2, 6, size=n)), reverse=True)
    return blob_subject(SHAPE, centers, radii, seed=seed)


@pytest.fixture(scope="module")
def segmenter():
    """An 8-channel network trained for 150 steps to segment the spheres (seconds on CPU)."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    data = [(normalize_intensity(img), (mask > 0).astype(np.int64)) for img, mask in map(_subject, range(8))]
    model = MultitaskNet(NetConfig(channels=8, blocks=1), DEFAULT_SCHEMA)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    boxes = torch.tensor([[0, 0, 0, 0, 1, 1, 1], [1, 0, 0, 0, 1, 1, 1]])
    for _ in range(150):
        xs, ys = [], []
        for img, seg in (data[i] for i in rng.integers(len(data), size=2)):
            o = [int(rng.integers(0, n - 16 + 1)) for n in SHAPE]
            sl = tuple(slice(a, a + 16) for a in o)
            xs.append(img[sl][None])
            ys.append(seg[sl])
        out = model(torch.from_numpy(np.stack(xs)), boxes)
        loss = F.cross_entropy(out["seg"], torch.from_numpy(np.stack(ys)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_windows_cover_the_axis_and_end_flush():
    assert window_origins(40, 48, 0.25) == [0]
    starts = window_origins(100, 48, 0.25)
    assert starts == [0, 36, 52]  # every 36 voxels, the last flush with the end
    covered = np.zeros(100, bool)
    for s in starts:
        covered[s:s + 48] = True
    assert covered.all()
    with pytest.raises(InputError, match=r"detect\.window"):
        DetectConfig(window=30)


def test_sliding_windows_agree_with_one_pass(segmenter):
    img, mask = _subject(100)
    image = normalize_intensity(img)
    whole = tumor_probability(segmenter, image, window=128)  # one window holds the scan
    tiled = tumor_probability(segmenter, image, window=16, overlap=0.5)  # 4-5 windows per axis
    assert whole.shape == tiled.shape == image.shape
    a, b = whole > 0.5, tiled > 0.5
    assert 2 * (a & b).sum() / (a.sum() + b.sum()) > 0.9
    found, truth = a, mask > 0
    assert 2 * (found & truth).sum() / (found.sum() + truth.sum()) > 0.7  # it learned the spheres


def _write_cohort(root, seeds, *, masks=True):
    rows = []
    for s in seeds:
        img, mask = _subject(s)
        write_nifti(root / "img" / f"s{s}.nii.gz", img, AFFINE)
        if masks:
            write_nifti(root / "seg" / f"s{s}.nii.gz", mask, AFFINE)
        for tid in (np.unique(mask[mask > 0]) if masks else [None]):
            rows.append({"patient_id": f"P{s}", "scan_id": f"S{s}", "image": f"img/s{s}.nii.gz",
                         "mask": f"seg/s{s}.nii.gz" if masks else "", "tumor_id": "" if tid is None else int(tid)})
    return write_manifest(root / "manifest.csv", rows)


def test_a_scan_without_mask_yields_predicted_rows_whose_largest_is_the_true_one(tmp_path, segmenter):
    manifest = _write_cohort(tmp_path, [200, 201, 202], masks=False)
    cohort, errors = read_manifest_lenient(manifest)
    assert errors == [] and all(r.mask is None and r.tumor_id == 0 for r in cohort.rows)
    for s, rows in zip((200, 201, 202), cohort.scans().values(), strict=True):
        out = embed_scan(segmenter, "m", rows, spacing_mm=2.0, patch_size=16, secret=SECRET, file_hash="")
        assert out and all(r["source"] == "predicted" and r["label_tumor_type"] == -1 for r in out)
        # the found count is kept, but not read as the scan's count (retrieval.scan_count: heads without it)
        assert all(r["scan_tumors"] == len(out) for r in out)
        assert np.isnan(shard_parts(pa.Table.from_pylist(out))["scan_log_tumors"]).all()
        _img, mask = _subject(s)
        true_ml = np.bincount(mask.ravel())[1:] * 8 / 1000
        big = max(out, key=lambda r: r["volume_ml"])
        centre = np.argwhere(mask == 1 + int(np.argmax(true_ml))).mean(0) * 2.0  # affine: 2 mm, origin 0
        assert np.linalg.norm(np.asarray(big["centroid_mm"]) - centre) < 3.0
        assert big["volume_ml"] == pytest.approx(true_ml.max(), rel=0.35)


def test_manifest_and_folder_without_masks(tmp_path):
    img, _ = _subject(1)
    write_nifti(tmp_path / "a" / "x.nii.gz", img, AFFINE)
    write_nifti(tmp_path / "a" / "sub" / "y.nii", img, AFFINE)
    (tmp_path / "a" / "notes.txt").write_text("not a scan")
    os.symlink(tmp_path / "a" / "x.nii.gz", tmp_path / "outside.nii.gz")
    os.symlink(tmp_path / "outside.nii.gz", tmp_path / "a" / "link.nii.gz")  # resolves inside: kept
    cohort = folder_cohort(tmp_path / "a")
    assert [r.scan_id for r in cohort.rows] == ["link", "sub/y", "x"]
    assert all(r.mask is None and r.patient_id == r.scan_id for r in cohort.rows)
    (tmp_path / "b").mkdir()
    with pytest.raises(InputError, match="no NIfTI file"):
        folder_cohort(tmp_path / "b")
    with pytest.raises(InputError, match=r"m\.csv: not a folder"):
        folder_cohort(tmp_path / "m.csv")
    rows = [{"patient_id": "P", "scan_id": "S", "image": "a/x.nii.gz", "mask": "", "tumor_id": ""},
            {"patient_id": "Q", "scan_id": "T", "image": "a/x.nii.gz", "mask": "", "tumor_id": "",
             "tumor_type": "metastasis"}]
    manifest = write_manifest(tmp_path / "m.csv", rows)
    cohort, errors = read_manifest_lenient(manifest)
    assert [r.scan_id for r in cohort.rows] == ["S"]
    assert len(errors) == 1 and "m.csv row 2" in errors[0].message and "['tumor_type']" in errors[0].message
    with pytest.raises(InputError, match="row 1 column 'mask': empty path"):
        read_manifest(manifest, check_files=False)


def test_detection_quality_and_search_by_image_alone(tmp_path, segmenter):
    manifest = _write_cohort(tmp_path, range(300, 310))
    cohort = read_manifest(manifest)
    split = record_split(cohort, test_fraction=0.3, seed=0)
    model_path = tmp_path / "model.pt"
    mid = export_model(segmenter, model_path, extra={"spacing_mm": [2.0] * 3, "patch_size": 16, "split": split,
                                                     "run": "test", "steps": 150})
    res = detection_quality(model_path, manifest)
    _, held_out = split_of_model(cohort, load_model(model_path)[1], where="test")
    sizes = [t.size_mm for sid in held_out for t in load_scan(cohort.scans()[sid]).tumors]
    assert res["scans"] == 3 and res["true_tumors"] == sum(s >= 10.0 for s in sizes)
    assert res["recall"] >= 0.9 and res["precision"] >= 0.9 and res["largest_matched"] == 1.0
    only_large = detection_quality(model_path, manifest, min_size_mm=15.0)
    assert only_large["true_tumors"] == sum(s >= 15.0 for s in sizes)
    # a threshold sweep (the probability computed once per scan): the model's own threshold first
    sweep = detection_sweep(model_path, manifest, thresholds=[0.05, 0.5, 0.9999999])
    assert [r["threshold"] for r in sweep] == [0.5, 0.05, 0.9999999] and sweep[0] == res
    assert sweep[2]["recall"] < res["recall"] and sweep[2]["true_tumors"] == res["true_tumors"]
    # and other sliding windows: a probability per window, every threshold on each; a window as large as
    # the scan at any overlap is the same single pass
    sweep = detection_sweep(model_path, manifest, thresholds=[0.9999999], windows=[(16, 0.5), (128, 0.5)])
    assert [(r["window"], r["overlap"], r["threshold"]) for r in sweep] == [
        (128, 0.25, 0.5), (128, 0.25, 0.9999999), (16, 0.5, 0.5), (16, 0.5, 0.9999999), (128, 0.5, 0.5),
        (128, 0.5, 0.9999999)]
    assert sweep[0] == {**res, "window": 128, "overlap": 0.25} and sweep[4] == {**sweep[0], "overlap": 0.5}
    assert sweep[2]["true_tumors"] == res["true_tumors"] and sweep[2]["recall"] >= 0.9  # small windows find them too
    assert sweep[3]["recall"] < sweep[2]["recall"]

    scans = list(cohort.scans().values())
    rows = [r for scan in scans for r in embed_scan(segmenter, mid, scan, spacing_mm=2.0, patch_size=16,
                                                     secret=SECRET)]
    write_shard(rows, tmp_path / "emb" / "s.parquet", model_shard_schema(segmenter, RetrievalConfig()))
    img = tmp_path / "img" / "s300.nii.gz"
    found = search(model_path, tmp_path / "emb", query_rows(img, None), k=3)
    masked = search(model_path, tmp_path / "emb", query_rows(img, tmp_path / "seg" / "s300.nii.gz"), k=3)
    assert len(found) >= 1 and all(len(q["hits"]) == 3 for q in found)
    # the largest found tumor is the largest masked one: the same size and the same top hit
    big = max(found, key=lambda q: q["size_mm"])
    true_big = max(masked, key=lambda q: q["size_mm"])
    assert big["size_mm"] == pytest.approx(true_big["size_mm"], rel=0.15)
    assert big["hits"][0]["scan_key"] == true_big["hits"][0]["scan_key"]
    # a scan without any sphere: nothing found, and the error says what to give instead
    write_nifti(tmp_path / "empty.nii.gz", 100 + np.random.default_rng(5).normal(0, 5, SHAPE), AFFINE)
    with pytest.raises(InputError, match=r"empty\.nii\.gz: the model found no tumor in this scan \(give --mask"):
        search(model_path, tmp_path / "emb", query_rows(tmp_path / "empty.nii.gz", None), k=3)


def test_dice_matrix_by_hand():
    truth = np.zeros((6, 6, 6), int)
    found = np.zeros((6, 6, 6), int)
    truth[0:2, 0:2, 0:2] = 1  # 8 voxels
    found[0:2, 0:2, 0:1] = 1  # 4 voxels, inside it
    found[4:6, 4:6, 4:6] = 2  # nowhere near
    d = dice_matrix(truth, found)
    assert d.shape == (1, 2)
    assert d[0, 0] == pytest.approx(2 * 4 / 12) and d[0, 1] == 0.0


def test_detect_windows_are_read_and_checked():
    from retrieval.detection import parse_windows

    assert parse_windows("64:0.5,96:0") == [(64, 0.5), (96, 0.0)]
    with pytest.raises(InputError, match=r"expected WINDOW:OVERLAP items .* got '64'"):
        parse_windows("64")
    with pytest.raises(InputError, match=r"detect\.window: must be a multiple of 4 and >= 16, got 30"):
        parse_windows("64:0.5,30:0.5")
    with pytest.raises(InputError, match=r"detect.overlap: must be in \[0, 1\), got 1.0"):
        parse_windows("64:1")


def test_detection_line_reads_back_from_json():
    from retrieval.detection import format_detection

    res = {"scans": 2, "on": "test", "min_size_mm": 10.0, "min_dice": 0.3, "true_tumors": 0, "found_tumors": 0,
           "recall": None, "precision": float("nan"), "largest_matched": 0.5, "threshold": 0.5}
    assert format_detection(res) == ("Detection on 2 test scans at threshold 0.5 (tumors >= 10 mm, match: Dice >= "
                                     "0.3): recall n/a of 0 true tumors, precision n/a of 0 found; largest tumor "
                                     "found in 50% of the scans")


def test_a_box_query_reads_the_scans_tumor_count_only_where_it_is_given(archive, small_cohort, monkeypatch, capsys):
    """retrieval.scan_count: a drawn box's parts carry the log of the scan's tumor count where it is given
    (search --scan-tumors), else NaN (unknown: heads fit without the count read the box; nineteenth
    round), and no detection runs for it; a recipe without it reads 1, and a count given to it is named
    in a warning as having no effect."""
    import retrieval.search as rs
    import tumornet.detect as det
    from tumornet.volumes import load_volume

    cohort = read_manifest(small_cohort)
    scan = next(s for s in cohort.scans().values() if len(s) > 1)
    net = load_model(archive / "model.pt")[0]
    vol = load_volume(scan[0].image, scan_id="q", spacing_mm=4.0)
    box_mm = [-10.0, -10.0, -10.0, 10.0, 10.0, 10.0]
    monkeypatch.setattr(det, "detect_tumors", lambda *a: pytest.fail("detection run for a box query's count"))
    cfg = RetrievalConfig(scan_count=True)
    assert np.isnan(rs.drawn_box_parts(net, vol, box_mm, cfg=cfg, patch_size=16, where="q")["scan_log_tumors"])
    given = rs.drawn_box_parts(net, vol, box_mm, cfg=cfg, patch_size=16, where="q", scan_tumors=2)
    assert given["scan_log_tumors"] == pytest.approx(np.log(2))
    assert capsys.readouterr().err == ""
    assert rs.drawn_box_parts(net, vol, box_mm, cfg=RetrievalConfig(), patch_size=16, where="q")["scan_log_tumors"] == 0
    rs.drawn_box_parts(net, vol, box_mm, cfg=RetrievalConfig(), patch_size=16, where="q", scan_tumors=4)
    assert "--scan-tumors 4 has no effect" in capsys.readouterr().err
    with pytest.raises(InputError, match="--scan-tumors: expected a whole number >= 1"):
        rs.drawn_box_parts(net, vol, box_mm, cfg=cfg, patch_size=16, where="q", scan_tumors=0)
    # several boxes of one scan may share its registration (benchmarks/box_count.py), unless it leaves the box out
    from tumornet.register import register

    placed = RetrievalConfig(position=1.0, position_frame="atlas")
    own = rs.drawn_box_parts(net, vol, box_mm, cfg=placed, patch_size=16, where="q")
    frame = register(vol.array, vol.affine)
    shared = rs.drawn_box_parts(net, vol, box_mm, cfg=placed, patch_size=16, where="q", frame=frame)
    assert np.allclose(own["template_position"], shared["template_position"]) and np.allclose(own["atlas"],
                                                                                             shared["atlas"])
    with pytest.raises(InputError, match=r"q: a registration given .*\(retrieval\.frame_skips_tumors\)"):
        rs.drawn_box_parts(net, vol, box_mm, cfg=RetrievalConfig(position=1.0, position_frame="atlas",
                                                                 frame_skips_tumors=True),
                           patch_size=16, where="q", frame=frame)


def test_a_masks_box_reads_its_own_extent_as_an_exactly_drawn_box_does(archive, small_cohort, tmp_path):
    """On a scan whose grid is not the model's working grid, a mask's box part reads the extent of its
    box on the scan's own grid (tumornet.tumors.tumor_extent), not that of the working grid's voxels
    that cover it (up to one more on each side): a box drawn exactly around the tumor (search --box with
    its bbox_mm) reads the same size (nineteenth round)."""
    import dataclasses

    import nibabel as nib

    import retrieval.search as rs
    from tumornet.volumes import load_volume

    rows = next(s for s in read_manifest(small_cohort).scans().values() if len(s) > 1)
    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    affine[:3, 3] = 0.7  # 3 mm voxels off the 4 mm working grid
    for name, path in (("img", rows[0].image), ("seg", rows[0].mask)):
        write_nifti(tmp_path / f"{name}.nii.gz", np.asarray(nib.load(path).dataobj), affine)
    new = [dataclasses.replace(r, image=tmp_path / "img.nii.gz", mask=tmp_path / "seg.nii.gz") for r in rows]
    net = load_model(archive / "model.pt")[0]
    out = embed_scan(net, "m", new, spacing_mm=4.0, patch_size=16, secret=SECRET, file_hash="")
    vol = load_volume(new[0].image, scan_id="q", spacing_mm=4.0)
    larger = []
    for r in out:
        own_ml = np.prod(np.subtract(r["bbox_mm"][3:], r["bbox_mm"][:3])) / 1000
        assert r["box_log_volume"] == pytest.approx(np.log(own_ml), abs=1e-5)
        drawn = rs.drawn_box_parts(net, vol, r["bbox_mm"], cfg=RetrievalConfig(), patch_size=16, where="q")
        assert drawn["box_log_volume"] == pytest.approx(r["box_log_volume"], abs=1e-5)
        covering_ml = np.prod(np.subtract(r["bbox"][3:], r["bbox"][:3])) * 4.0 ** 3 / 1000
        larger.append(np.log(covering_ml) - r["box_log_volume"])
    assert len(out) >= 2 and min(larger) >= 0 and max(larger) > 0.1  # what the part read before


def test_a_detector_finds_the_tumors_that_the_model_embeds(tmp_path, segmenter):
    """embed / evaluate --detection / search --image with --detector: another model file's segmentation
    head finds the tumors of scans without a mask (at its own detect settings), the model embeds them."""
    import dataclasses
    import json

    from embedder.embed import load_detector, settings_fingerprint
    from embedder.job import ShardEmbedder, _row_dict, decode_shard
    from retrieval.detection import format_detection
    from tumornet.keys import keyed_id

    torch.manual_seed(1)
    blind = MultitaskNet(NetConfig(channels=8, blocks=1, seg_prior=1e-6), DEFAULT_SCHEMA).eval()  # finds nothing
    manifest = _write_cohort(tmp_path, range(300, 310))
    cohort = read_manifest(manifest)
    split = record_split(cohort, test_fraction=0.3, seed=0)
    extra = {"spacing_mm": [2.0] * 3, "patch_size": 16, "split": split, "run": "test", "steps": 150}
    model_path, detector_path = tmp_path / "model.pt", tmp_path / "detector.pt"
    mid = export_model(blind, model_path, extra=extra)
    did = export_model(segmenter, detector_path, extra=extra | {"config": {"detect": {"threshold": 0.4}}})
    model_meta = load_model(model_path)[1]
    net, meta, cfg = load_detector(detector_path, model_meta, [2.0] * 3)
    assert meta["model_id"] == did and cfg == DetectConfig(threshold=0.4)  # the detector's own settings
    assert load_detector(detector_path, model_meta, [2.0] * 3, min_volume_ml=0.2)[2].min_volume_ml == 0.2
    assert load_detector(None, model_meta, [2.0] * 3) == (None, None, DetectConfig())  # none: the model's own

    unmasked = [dataclasses.replace(r, mask=None, tumor_id=0, labels={}) for r in cohort.scans()["S300"][:1]]
    kw = {"spacing_mm": 2.0, "patch_size": 16, "secret": SECRET, "file_hash": ""}
    assert embed_scan(blind, mid, unmasked, **kw) == []  # its own head finds nothing
    by_detector = embed_scan(blind, mid, unmasked, **kw, detect=cfg, detector=net)
    by_itself = embed_scan(segmenter, did, unmasked, **kw, detect=cfg)
    assert len(by_detector) == len(by_itself) >= 2 and all(r["source"] == "predicted" for r in by_detector)
    assert [r["bbox"] for r in by_detector] == [r["bbox"] for r in by_itself]  # the same tumors found
    assert all(r["model_id"] == mid for r in by_detector)  # embedded by the model, not the detector
    assert not np.allclose(by_detector[0]["roipool"], by_itself[0]["roipool"])
    # the detector is part of what decides a shard row (an archive without one keeps its fingerprint)
    recipe = (RetrievalConfig(), None)
    plain = settings_fingerprint(2.0, 16, recipe, cfg)
    assert plain == settings_fingerprint(2.0, 16, recipe, cfg, None) != settings_fingerprint(2.0, 16, recipe, cfg, did)

    # the embedding job's actor loads the detector once and finds the tumors with it
    job = {"model_path": str(model_path), "out_dir": str(tmp_path / "o"), "secret": SECRET.hex(), "spacing_mm": 2.0,
           "patch_size": 16, "recipe": dataclasses.asdict(RetrievalConfig()), "stats": None, "threads": 1,
           "stamp": "t", "detect": dataclasses.asdict(cfg), "gpus": 0, "precision": "fp32", "settings": "s",
           "detector_path": str(detector_path)}
    item = {"job": job, "scans": [{"scan_key": keyed_id("S300", SECRET), "done": [],
                                   "rows": [_row_dict(r) for r in unmasked]}]}
    decoded = decode_shard({"shard": 0, "payload": json.dumps(item)})
    out = ShardEmbedder()({k: np.array([v], dtype=object) for k, v in decoded.items()})
    assert list(out["status"]) == ["embedded"] and int(out["tumors"][0]) == len(by_detector)

    # detection quality by the detector on the model's held-out split: the detector's own figures
    alone = detection_quality(detector_path, manifest)
    assert detection_quality(model_path, manifest)["recall"] == 0.0
    res = detection_quality(model_path, manifest, detector=detector_path)
    assert res["detector_id"] == did and res["model_id"] == mid and res["recall"] == alone["recall"] >= 0.9
    assert res["threshold"] == 0.4 and f"Detection by detector {did} on 3 test scans" in format_detection(res)
    same = tmp_path / "same.pt"  # the same patients' split, recorded with another salt: accepted
    export_model(segmenter, same, extra=extra | {"split": record_split(cohort, test_fraction=0.3, seed=0)})
    assert detection_quality(model_path, manifest, detector=same)["recall"] == res["recall"]
    other = tmp_path / "other.pt"
    export_model(segmenter, other, extra=extra | {"split": record_split(cohort, test_fraction=0.3, seed=1)})
    assert split_of_model(cohort, load_model(other)[1], where="o")[1] != split_of_model(cohort, meta, where="m")[1]
    with pytest.raises(InputError, match=r"other\.pt: the detector's test patients are not the model's"):
        detection_quality(model_path, manifest, detector=other)
    coarse = tmp_path / "coarse.pt"
    export_model(segmenter, coarse, extra=extra | {"spacing_mm": [4.0] * 3})
    with pytest.raises(InputError, match=r"coarse\.pt: the detector was trained at \[4\.0, 4\.0, 4\.0\] mm"):
        detection_quality(model_path, manifest, detector=coarse)

    # search by image alone: the model alone finds nothing, with the detector it searches
    rows = [r for scan in cohort.scans().values() for r in embed_scan(blind, mid, scan, **kw)]
    write_shard(rows, tmp_path / "emb" / "s.parquet", model_shard_schema(blind, RetrievalConfig()))
    img = tmp_path / "img" / "s300.nii.gz"
    with pytest.raises(InputError, match="the model found no tumor"):
        search(model_path, tmp_path / "emb", query_rows(img, None), k=3)
    found = search(model_path, tmp_path / "emb", query_rows(img, None), k=3, detector=detector_path)
    assert len(found) == len(by_detector) and all(len(q["hits"]) == 3 for q in found)
