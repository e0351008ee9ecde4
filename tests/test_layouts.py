import csv

import numpy as np
import pytest

from tumornet.anatomy import load_anatomy
from tumornet.errors import InputError
from tumornet.layouts import import_layout
from tumornet.manifest import read_manifest
from tumornet.register import register
from tumornet.scans import load_scan
from tumornet.volumes import resample, save_nifti

SPACING = 3.0


def _sphere(shape, affine, center_mm, radius_mm):
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    world = grid @ affine[:3, :3].T + affine[:3, 3]
    return np.linalg.norm(world - np.asarray(center_mm), axis=-1) <= radius_mm


def _case(root, folder, image_name, mask_name, image, seg, affine, axcodes):
    save_nifti(root / folder / image_name, image * 1000, affine, axcodes=axcodes, dtype=np.int16)
    save_nifti(root / folder / mask_name, seg.astype(np.float32), affine, axcodes=axcodes, dtype=np.uint8)


@pytest.fixture(scope="module")
def template_3mm():
    anat = load_anatomy()
    brain, affine = resample(anat.t1_brain, anat.affine, (SPACING,) * 3, order=1)
    head, _ = resample(anat.t1, anat.affine, (SPACING,) * 3, order=1)
    return brain, head, affine


def test_brats_met_tree(tmp_path, template_3mm, monkeypatch):
    import tumornet.layouts as layouts

    left_out, warps = [], []  # what the registration behind the labels leaves out of its similarity, how it bends
    monkeypatch.setattr(layouts, "register", lambda *a, ignore, **kw: left_out.append(ignore)
                        or warps.append(kw["warp_mm"]) or register(*a, **kw))
    brain, _, affine = template_3mm
    seg = np.zeros(brain.shape, np.uint8)
    seg[_sphere(brain.shape, affine, (40, 30, 40), 12)] = 2  # oedema
    seg[_sphere(brain.shape, affine, (40, 30, 40), 7)] = 3  # enhancing
    seg[_sphere(brain.shape, affine, (40, 30, 40), 3)] = 1  # necrosis
    seg[_sphere(brain.shape, affine, (-25, -65, -35), 5)] = 3  # a smaller cerebellar met
    for case in ("BraTS-MET-00001-000", "BraTS-MET-00001-001"):
        _case(tmp_path, case, f"{case}-t1c.nii.gz", f"{case}-seg.nii.gz", brain, seg, affine, "LPS")
    bad = seg.copy()
    bad[0, 0, 0] = 4
    _case(tmp_path, "BraTS-MET-00002-000", "BraTS-MET-00002-000-t1c.nii.gz", "BraTS-MET-00002-000-seg.nii.gz",
          brain, bad, affine, "LPS")
    (tmp_path / "not-a-case").mkdir()
    manifest = import_layout(tmp_path, "brats-met", log=lambda *_: None)
    rows = list(csv.DictReader(open(manifest)))
    assert [(r["scan_id"], r["tumor_id"]) for r in rows] == [
        ("BraTS-MET-00001-000", "1"), ("BraTS-MET-00001-000", "2"),
        ("BraTS-MET-00001-001", "1"), ("BraTS-MET-00001-001", "2")]
    assert {r["patient_id"] for r in rows} == {"BraTS-MET-00001"}
    # the registration behind the labels leaves every labelled region out, the oedema included: the
    # larger box is the 12 mm sphere's (24 mm: 7-8 voxels of 3 mm), not the 7 mm enhancing one's
    assert len(left_out) == 2 and [len(boxes) for boxes in left_out] == [2, 2]
    assert warps == [layouts.IMPORT_WARP_MM] * 2 == [24.0] * 2  # bent by default, as the site recipe
    extents = sorted((np.asarray(b)[3:] - np.asarray(b)[:3]).tolist() for b in left_out[0])
    assert all(7 <= n <= 9 for n in extents[1]) and all(n <= 5 for n in extents[0])
    big, small = rows[0], rows[1]
    assert (big["tumor_type"], big["area"], big["left_right"], big["front_rear"], big["upper_lower"]) == (
        "metastasis", "frontal", "right", "front", "upper")
    assert (small["area"], small["left_right"], small["front_rear"], small["upper_lower"]) == (
        "cerebellum", "left", "rear", "lower")
    errors = (tmp_path / "manifest.csv.errors.txt").read_text()
    assert errors.startswith("case 3 of 3 (sorted folder names): "
                             "<root>/<case>/<case>-seg.nii.gz: unknown label value(s) [4]")
    assert "BraTS-MET" not in errors
    cohort = read_manifest(manifest)
    scan = load_scan(cohort.scans()["BraTS-MET-00001-000"])
    # necrosis + enhancing, oedema excluded: the big tumor is the 7 mm sphere
    assert 4 / 3 * np.pi * 7**3 / 1000 * 0.6 < scan.tumors[0].volume_ml < 4 / 3 * np.pi * 7**3 / 1000 * 1.6


def test_vestibular_schwannoma_tree(tmp_path, template_3mm):
    _, head, affine = template_3mm
    seg = _sphere(head.shape, affine, (26, -27, -30), 6).astype(np.uint8)
    _case(tmp_path, "vs_gk_1", "vs_gk_t1_refT1.nii.gz", "vs_gk_seg_refT1.nii.gz", head, seg, affine, "LAS")
    manifest = import_layout(tmp_path, "vs-seg", log=lambda *_: None)
    (row,) = list(csv.DictReader(open(manifest)))
    assert row["patient_id"] == row["scan_id"] == "vs_gk_1"
    assert (row["tumor_type"], row["area"], row["left_right"], row["front_rear"], row["upper_lower"]) == (
        "schwannoma", "skull_base_cpa", "right", "rear", "lower")
    assert len(read_manifest(manifest).rows) == 1
    # `import --warp-mm 0`: the affine registration alone; this tumor, far from any border, keeps its labels
    from ray_job import main

    assert main(["import", "vs-seg", str(tmp_path), "--name", "affine.csv", "--warp-mm", "0"]) == 0
    (affine_row,) = list(csv.DictReader(open(tmp_path / "affine.csv")))
    assert affine_row == row


def test_layout_errors(tmp_path):
    with pytest.raises(InputError, match="unknown layout"):
        import_layout(tmp_path, "brats-gli")
    with pytest.raises(InputError, match=r"--warp-mm: expected 0 \(affine registration only\) or .* >= 8 mm, got 4"):
        import_layout(tmp_path, "vs-seg", warp_mm=4)
    with pytest.raises(InputError, match="no case folder matching the vs-seg layout"):
        import_layout(tmp_path, "vs-seg")
