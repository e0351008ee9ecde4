import numpy as np
import pytest

from tumornet import boxes as B
from tumornet.errors import InputError


def test_box_from_mask_is_half_open_and_tight():
    m = np.zeros((10, 12, 14), bool)
    m[2:5, 3:4, 7:12] = True
    box = B.box_from_mask(m)
    assert box.tolist() == [2, 3, 7, 5, 4, 12]
    assert B.box_size(box).tolist() == [3, 1, 5]
    assert m[B.box_slices(box)].all()
    assert not box.flags.writeable


def test_box_from_empty_mask_raises():
    with pytest.raises(InputError, match="empty mask"):
        B.box_from_mask(np.zeros((4, 4, 4)))


def test_margin_clip_shift_contains():
    box = B.make_box([2, 2, 2], [5, 6, 7])
    grown = B.add_margin(box, 3)
    assert grown.tolist() == [-1, -1, -1, 8, 9, 10]
    assert B.contains(grown, box) and not B.contains(box, grown)
    assert B.clip_box(grown, (6, 20, 9)).tolist() == [0, 0, 0, 6, 9, 9]
    outside = B.clip_box(B.shift_box(box, [50, 0, 0]), (10, 10, 10))
    assert B.is_empty(outside)
    assert B.box_center(box).tolist() == [3.0, 3.5, 4.0]


def test_box_mm_round_trip_with_flipped_anisotropic_affine():
    affine = np.array([[-0.8, 0, 0, 50], [0, 1.5, 0, -20], [0, 0, 3.0, 7], [0, 0, 0, 1]])
    box = B.make_box([3, 4, 1], [9, 10, 5])
    mm = B.box_to_mm(box, affine)
    assert np.all(mm[:3] <= mm[3:])
    # extent in mm = voxels x spacing
    assert np.allclose(mm[3:] - mm[:3], [6 * 0.8, 6 * 1.5, 4 * 3.0])
    assert B.box_mm_to_voxels(mm, affine).tolist() == box.tolist()


def test_box_mm_to_coarser_grid_covers_the_box():
    fine = np.diag([1.0, 1.0, 1.0, 1.0])
    coarse = np.diag([2.0, 2.0, 2.0, 1.0])
    coarse[:3, 3] = 0.5  # grids sharing the outer corner
    box = B.make_box([3, 3, 3], [8, 9, 10])
    mm = B.box_to_mm(box, fine)
    cbox = B.box_mm_to_voxels(mm, coarse)
    cmm = B.box_to_mm(cbox, coarse)
    assert np.all(cmm[:3] <= mm[:3] + 1e-9) and np.all(cmm[3:] >= mm[3:] - 1e-9)
    assert np.all(B.box_size(cbox) <= np.ceil(B.box_size(box) / 2) + 1)


def test_a_drawn_box_measures_its_own_extent_not_the_voxels_covering_it():
    affine = np.array([[-2.0, 0, 0, 50], [0, 2.0, 0, -20], [0, 0, 2.0, 7], [0, 0, 0, 1]])
    box = B.make_box([10, 10, 10], [15, 15, 15])  # 5 voxels = 10 mm a side
    mm = np.asarray(B.box_to_mm(box, affine))
    drawn = B.grown_box_mm(mm, 0.2)  # drawn 20 % too large, about the same centre
    assert np.allclose(drawn[3:] - drawn[:3], 1.2 * (mm[3:] - mm[:3]))
    assert np.allclose(drawn[:3] + drawn[3:], mm[:3] + mm[3:])
    assert np.allclose(B.grown_box_mm(drawn, -1 / 6), mm)
    assert np.allclose(B.box_mm_extent(mm, affine, (40, 40, 40)), 5.0)
    assert np.allclose(B.box_mm_extent(drawn, affine, (40, 40, 40)), 6.0)
    assert B.box_size(B.box_mm_to_voxels(drawn, affine, (40, 40, 40))).tolist() == [7, 7, 7]  # a voxel more a side
    # clipped to the array: the part outside the scan is not measured
    assert np.allclose(B.box_mm_extent(drawn, affine, (40, 40, 14)), [6.0, 6.0, 4.5])  # voxels 9 to 13.5


def test_distort_box_statistics_match_paper_eq2():
    rng = np.random.default_rng(0)
    box = B.make_box([100, 100, 100], [140, 140, 140])
    sizes, shifts = [], []
    for _ in range(4000):
        d = B.distort_box(box, rng)
        sizes.append(np.log2(B.box_size(d) / 40.0))
        shifts.append(((B.box_lo(d) + B.box_hi(d)) / 2 - 120) / 40.0)
    sizes, shifts = np.array(sizes), np.array(shifts)
    assert abs(sizes.mean()) < 0.02 and abs(sizes.std() - 1 / 3) < 0.02
    assert abs(shifts.mean()) < 0.01 and abs(shifts.std() - 0.1) < 0.01
    assert np.all(B.box_size(B.distort_box(B.make_box([0, 0, 0], [1, 1, 1]), rng)) >= 1)


def test_ellipsoid_voxels_fill_the_inscribed_ellipsoid():
    box = B.make_box([2, 3, 4], [22, 13, 9])  # 20 x 10 x 5 voxels
    pts = B.ellipsoid_voxels(box)
    assert len(pts) == pytest.approx(np.pi / 6 * 20 * 10 * 5, rel=0.2)
    assert np.all(pts >= [2, 3, 4]) and np.all(pts < [22, 13, 9])
    assert np.allclose(pts.mean(0), B.box_center(box), atol=0.6)
    big = B.make_box([0, 0, 0], [80, 80, 80])  # a stride keeps about max_points, the centre among them
    pts = B.ellipsoid_voxels(big, max_points=500)
    assert 250 <= len(pts) <= 600 and np.any(np.all(pts == np.floor(B.box_center(big)), axis=1))
    assert np.array_equal(B.ellipsoid_voxels(B.make_box([5, 5, 5], [6, 6, 6])), [[5, 5, 5]])


def test_overlaps_means_a_shared_voxel():
    from tumornet.boxes import overlaps

    a = [0, 0, 0, 4, 4, 4]
    assert overlaps(a, [3, 3, 3, 6, 6, 6]) and overlaps([1, 1, 1, 2, 2, 2], a)  # corner / inside
    assert not overlaps(a, [4, 0, 0, 8, 4, 4])  # touching faces of half-open boxes share none
    assert not overlaps(a, [0, 5, 0, 4, 9, 4])
