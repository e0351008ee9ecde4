import csv
from collections import Counter

import nibabel as nib
import numpy as np
import pytest

from tumornet.boxes import voxel_to_mm
from tumornet.errors import InputError
from tumornet.manifest import read_manifest
from tumornet.scans import load_scan
from tumornet.synth.phantom import PhantomConfig, generate_cohort, plan_patient
from tumornet.volumes import read_label_map, read_nifti


def _rows(manifest):
    return list(csv.DictReader(open(manifest)))


def test_same_seed_same_cohort_whatever_the_workers(tmp_path):
    a = generate_cohort(PhantomConfig(patients=3, seed=5, voxel_mm=4.0, workers=1), tmp_path / "a", log=print)
    b = generate_cohort(PhantomConfig(patients=3, seed=5, voxel_mm=4.0, workers=2), tmp_path / "b", log=print)
    c = generate_cohort(PhantomConfig(patients=3, seed=6, voxel_mm=4.0), tmp_path / "c", log=print)
    ra, rb = _rows(a), _rows(b)
    assert ra == rb
    for r in ra:
        ia, _ = read_nifti(a.parent / r["image"])
        ib, _ = read_nifti(b.parent / r["image"])
        assert np.array_equal(ia, ib)
    assert _rows(c) != ra


def test_type_proportions_follow_the_paper():
    cfg = PhantomConfig(patients=600, seed=0)
    plans = [plan_patient(i, cfg) for i in range(cfg.patients)]
    counts = Counter(p.kind for p in plans)
    for kind, expected in (("metastasis", 399 / 989), ("meningioma", 339 / 989), ("schwannoma", 251 / 989)):
        assert abs(counts[kind] / 600 - expected) < 0.06
    mets = [len(p.lesions) for p in plans if p.kind == "metastasis"]
    assert max(mets) > 1 and np.mean(mets) > 1.3  # metastases are often several
    assert all(len(p.lesions) == 1 for p in plans if p.kind != "metastasis")
    followups = sum(p.n_scans == 2 for p in plans) / 600
    assert 0.1 < followups < 0.2


def test_size_priors():
    cfg = PhantomConfig(patients=300, seed=1)
    sizes = {"metastasis": [], "meningioma": [], "schwannoma": []}
    for i in range(cfg.patients):
        p = plan_patient(i, cfg)
        sizes[p.kind] += [2 * max(les.parts[0].radii) for les in p.lesions]
    assert 2.5 < min(sizes["metastasis"]) and max(sizes["metastasis"]) < 38
    assert 9 < min(sizes["meningioma"]) and max(sizes["meningioma"]) < 62
    assert min(sizes["schwannoma"]) < 10 and max(sizes["schwannoma"]) < 40
    # sizes overlap between types
    assert max(sizes["metastasis"]) > min(sizes["meningioma"]) + 5


def test_labels_follow_anatomy_and_about_10_percent_are_missing(small_cohort):
    rows = _rows(small_cohort)
    by_type = {}
    for r in rows:
        by_type.setdefault(r["tumor_type"], []).append(r)
    intra = {"frontal", "parietal", "temporal", "occipital", "insula", "deep_grey_matter", "ventricles",
             "cerebellum", "brainstem", ""}
    assert {r["area"] for r in by_type.get("metastasis", [])} <= intra
    assert {r["area"] for r in by_type.get("meningioma", [])} <= {"convexity_falx", "skull_base_cpa", ""}
    assert {r["area"] for r in by_type.get("schwannoma", [])} <= {"skull_base_cpa", ""}
    assert {r["upper_lower"] for r in by_type.get("schwannoma", [])} <= {"lower", ""}
    cells = [r[k] for r in rows for k in ("tumor_type", "area", "left_right", "front_rear", "upper_lower")]
    missing = sum(c == "" for c in cells) / len(cells)
    assert 0.03 < missing < 0.2
    assert len({r["left_right"] for r in rows} - {""}) == 2


def test_scans_are_realistic_nifti(small_cohort):
    rows = _rows(small_cohort)
    orientations, contrasts = set(), []
    for r in rows[:12]:
        img = nib.load(small_cohort.parent / r["image"])
        assert img.get_data_dtype() == np.int16 and img.header["scl_slope"] not in (0, 1)
        orientations.add(nib.aff2axcodes(img.affine))
        data, _ = read_nifti(small_cohort.parent / r["image"])
        mask, _ = read_label_map(small_cohort.parent / r["mask"])
        tumor = mask == int(r["tumor_id"])
        assert tumor.any()
        brain_level = np.median(data[data > data.mean()])
        contrasts.append(data[tumor].mean() / brain_level)
    assert len(orientations) >= 2
    assert np.median(contrasts) > 1.1  # tumors enhance


def test_cohort_loads_through_the_manifest(small_cohort):
    cohort = read_manifest(small_cohort)
    scan_rows = next(iter(cohort.scans().values()))
    scan = load_scan(scan_rows, spacing_mm=4.0)
    assert scan.volume.spacing_mm == (4.0, 4.0, 4.0)
    assert len(scan.tumors) == len(scan_rows) and all(t.volume_ml > 0 for t in scan.tumors)


def test_config_validation():
    with pytest.raises(InputError, match=r"phantom\.patients"):
        PhantomConfig(patients=0)
    with pytest.raises(InputError, match="missing_fraction"):
        PhantomConfig(missing_fraction=1.5)
    with pytest.raises(InputError, match="orientations"):
        PhantomConfig(orientations=("LRS",))
    with pytest.raises(InputError, match=r"phantom\.t1_gamma"):
        PhantomConfig(t1_gamma=10)
    with pytest.raises(InputError, match=r"phantom\.head_scale"):
        PhantomConfig(head_scale=(1.1, 0.9))
    with pytest.raises(InputError, match=r"phantom\.template_warp_mm"):
        PhantomConfig(template_warp_mm=-1)


def _tumor_centroids_mm(manifest):
    out = {}
    for r in _rows(manifest):
        mask, affine = read_label_map(manifest.parent / r["mask"])
        out[(r["scan_id"], r["tumor_id"])] = voxel_to_mm(np.argwhere(mask == int(r["tumor_id"])).mean(0), affine)
    return out


def test_another_population_moves_the_anatomy_not_its_labels(tmp_path):
    """A cohort on a brain unlike the template (one shared warp, another contrast): the same patients'
    tumors lie elsewhere in the scan, their labels (read on the cohort's own anatomy) stay."""
    base = dict(patients=6, seed=4, voxel_mm=4.0, missing_fraction=0.0)
    a = generate_cohort(PhantomConfig(**base), tmp_path / "a", log=lambda *_: None)
    b = generate_cohort(PhantomConfig(**base, template_warp_mm=6.0, template_seed=2, t1_gamma=1.5), tmp_path / "b",
                        log=lambda *_: None)
    ra, rb = _rows(a), _rows(b)
    assert [(r["scan_id"], r["tumor_id"], r["tumor_type"]) for r in ra] == \
        [(r["scan_id"], r["tumor_id"], r["tumor_type"]) for r in rb]
    tasks = ("area", "left_right", "front_rear", "upper_lower")
    same = np.mean([ra[i][t] == rb[i][t] for i in range(len(ra)) for t in tasks])
    assert same >= 0.9
    ca, cb = _tumor_centroids_mm(a), _tumor_centroids_mm(b)
    moved = np.array([np.linalg.norm(ca[k] - cb[k]) for k in ca])
    assert np.median(moved) > 2.0  # the anatomy, and the tumors with it, moved by millimetres
    # the warp is the cohort's: drawn from template_seed, the same for every patient
    from tumornet.synth.phantom import _template_warp
    w1, w2, w3 = _template_warp(2, 6.0, None), _template_warp(2, 6.0, None), _template_warp(3, 6.0, None)
    assert np.array_equal(w1, w2) and not np.allclose(w1, w3)
    assert 1.0 < float(np.abs(w1).max()) < 40.0


def test_t1_gamma_changes_the_grey_white_contrast():
    from tumornet.synth.phantom import _template_for
    anat, t1, _ = _template_for((4.0, 4.0, 4.0), None, 1.0)
    _, t1g, _ = _template_for((4.0, 4.0, 4.0), None, 2.0)
    grey = anat.brain & (anat.cerebra > 0)
    white = anat.brain & (anat.cerebra == 0)
    ratio, ratio_g = (float(np.median(v[grey]) / np.median(v[white])) for v in (t1, t1g))
    assert ratio < 1.0 and abs(ratio_g - ratio**2) < 0.05  # grey darker than white, squared
