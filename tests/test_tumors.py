import numpy as np
import pytest

from conftest import blob_subject
from tumornet.boxes import box_to_mm
from tumornet.errors import InputError
from tumornet.tumors import equivalent_diameter_mm, instances_from_binary, measure_tumors, tumor_mask_from_labels


def test_instances_from_binary_numbers_components_by_size():
    m = np.zeros((20, 20, 20), bool)
    m[1:3, 1:3, 1:3] = True  # 8 voxels
    m[10:14, 10:14, 10:14] = True  # 64 voxels
    m[5, 15, 5] = True  # 1 voxel
    m[6, 16, 6] = True  # diagonal neighbour: same component under 26-connectivity
    inst = instances_from_binary(m)
    assert sorted(np.unique(inst).tolist()) == [0, 1, 2, 3]
    assert (inst == 1).sum() == 64 and (inst == 2).sum() == 8 and (inst == 3).sum() == 2
    assert inst[5, 15, 5] == inst[6, 16, 6] == 3
    assert instances_from_binary(m, min_voxels=3).max() == 2


def test_brats_labels_to_tumor_mask_excludes_oedema():
    seg = np.zeros((8, 8, 8), np.int32)
    seg[1:3, 1:3, 1:3] = 1  # NETC
    seg[3:5, 1:3, 1:3] = 3  # ET
    seg[5:8, :, :] = 2  # oedema
    t = tumor_mask_from_labels(seg, tumor_values=(1, 3), allowed_values=(1, 2, 3))
    assert t.sum() == 16 and not t[6].any()
    seg[0, 0, 0] = 4
    with pytest.raises(InputError, match=r"seg\.nii\.gz: unknown label value\(s\) \[4\]"):
        tumor_mask_from_labels(seg, tumor_values=(1, 3), allowed_values=(1, 2, 3), where="seg.nii.gz")


def test_measure_tumors_in_mm():
    _, mask = blob_subject(centers=((8, 9, 7),), radii=(3,))
    affine = np.diag([2.0, 1.0, 0.5, 1.0])
    affine[:3, 3] = [10, 20, 30]
    (t,) = measure_tumors(mask, affine, scan_id="s", labels={1: {"tumor_type": 0}})
    n = int((mask == 1).sum())
    assert t.volume_ml == pytest.approx(n * 1.0 / 1000)
    assert t.size_mm == pytest.approx(equivalent_diameter_mm(n * 1.0))
    assert np.allclose(t.centroid_mm, [10 + 2 * 8, 20 + 9, 30 + 0.5 * 7])
    assert t.bbox.tolist() == [5, 6, 4, 12, 13, 11]
    assert np.allclose(t.bbox_mm, [10 + 2 * 4.5, 20 + 5.5, 30 + 0.5 * 3.5, 10 + 2 * 11.5, 20 + 12.5, 30 + 0.5 * 10.5])
    assert t.labels == {"tumor_type": 0}


def test_equivalent_diameter_of_a_sphere():
    assert equivalent_diameter_mm(4 / 3 * np.pi * 10**3) == pytest.approx(20.0)


def test_measure_tumors_unknown_id_names_the_mask():
    _, mask = blob_subject()
    with pytest.raises(InputError, match=r"m\.nii: tumor_id \[7\] not found in the mask"):
        measure_tumors(mask, np.eye(4), scan_id="s", tumor_ids=[1, 7], where="m.nii")


def test_boxes_on_a_coarser_working_grid_cover_the_tumor():
    _, mask = blob_subject()
    grid = np.diag([2.0, 2.0, 2.0, 1.0])
    grid[:3, 3] = 0.5
    for t in measure_tumors(mask, np.eye(4), scan_id="s", grid_affine=grid, grid_shape=(12, 14, 10)):
        covered = box_to_mm(t.bbox, grid)
        assert np.all(covered[:3] <= t.bbox_mm[:3]) and np.all(covered[3:] >= t.bbox_mm[3:])
        assert np.all(covered[3:] - covered[:3] <= t.bbox_mm[3:] - t.bbox_mm[:3] + 4.0)
