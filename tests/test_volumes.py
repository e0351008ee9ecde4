import gzip

import nibabel as nib
import numpy as np
import pytest

from conftest import blob_subject, write_nifti
from tumornet.boxes import voxel_to_mm
from tumornet.errors import InputError
from tumornet.tumors import measure_tumors
from tumornet.volumes import (
    load_volume,
    normalize_intensity,
    read_label_map,
    read_nifti,
    resample,
    save_nifti,
    spacing_of,
)


def _centroids(path):
    mask, affine = read_label_map(path)
    return np.array([t.centroid_mm for t in measure_tumors(mask, affine, scan_id="s")])


@pytest.mark.parametrize("axcodes", ["LPS", "LAS", "PIL", "SRA"])
def test_centroid_mm_is_the_same_from_any_orientation(tmp_path, axcodes):
    _, mask = blob_subject()
    affine = np.diag([1.2, 0.9, 2.5, 1.0])
    affine[:3, 3] = [-30, 12, 5]
    ras = save_nifti(tmp_path / "ras.nii.gz", mask.astype(np.float32), affine, axcodes="RAS", dtype=np.uint8)
    other = save_nifti(tmp_path / "o.nii.gz", mask.astype(np.float32), affine, axcodes=axcodes, dtype=np.uint8)
    assert nib.aff2axcodes(nib.load(other).affine) == tuple(axcodes)
    assert np.allclose(_centroids(ras), _centroids(other), atol=1e-6)
    data, aff = read_nifti(other)
    assert nib.aff2axcodes(aff) == ("R", "A", "S") and data.shape == mask.shape


def test_int16_with_scl_slope_and_inter_is_scaled(tmp_path):
    arr = np.arange(2 * 3 * 4, dtype=np.int16).reshape(2, 3, 4)
    img = nib.Nifti1Image(arr, np.eye(4))
    img.header.set_slope_inter(0.5, 10.0)
    nib.save(img, str(tmp_path / "s.nii"))
    data, _ = read_nifti(tmp_path / "s.nii")
    assert data.dtype == np.float32
    assert np.allclose(data, arr * 0.5 + 10.0)


def test_resample_anisotropic_to_isotropic_keeps_extent_and_world_positions():
    arr = np.zeros((20, 20, 8), np.float32)
    arr[10:12, 10:12, 4] = 1.0  # a 2 x 2 x 3 mm blob
    affine = np.diag([1.0, 1.0, 3.0, 1.0])
    out, new_aff = resample(arr, affine, (2.0, 2.0, 2.0), order=0)
    assert out.shape == (10, 10, 12)
    assert np.allclose(spacing_of(new_aff), (2.0, 2.0, 2.0))
    # the physical extent (outer corners) is preserved
    old_corner = voxel_to_mm(np.array([-0.5, -0.5, -0.5]), affine)
    new_corner = voxel_to_mm(np.array([-0.5, -0.5, -0.5]), new_aff)
    assert np.allclose(old_corner, new_corner)
    # nearest resampling of a label keeps it near the same world point
    peak = voxel_to_mm(np.argwhere(out > 0).mean(0), new_aff)
    assert np.linalg.norm(peak - voxel_to_mm(np.array([10.5, 10.5, 4.0]), affine)) <= 1.5


def test_normalize_intensity_is_robust_zscore():
    rng = np.random.default_rng(0)
    arr = np.zeros((30, 30, 30), np.float32)
    arr[5:25, 5:25, 5:25] = rng.normal(500, 50, (20, 20, 20))
    arr[15, 15, 15] = 1e6  # a hot voxel must not dominate
    z = normalize_intensity(arr)
    fg = z[6:24, 6:24, 6:24]
    assert abs(fg.mean()) < 0.1 and abs(fg.std() - 1) < 0.15
    assert z.max() < 10


def test_load_volume_resamples_and_normalizes(tmp_path):
    image, _ = blob_subject()
    p = write_nifti(tmp_path / "i.nii.gz", image, np.diag([1.0, 1.0, 2.0, 1.0]))
    v = load_volume(p, scan_id="x", spacing_mm=2.0)
    assert v.array.dtype == np.float32 and v.spacing_mm == (2.0, 2.0, 2.0)
    assert v.shape == (12, 14, 20)
    assert abs(float(v.array[v.array > v.array.min() + 1e-3].mean())) < 1.0


# ---- bad input: each names the file and the problem -------------------------------------------

def test_missing_file(tmp_path):
    with pytest.raises(InputError, match=r"nope\.nii\.gz: file not found"):
        read_nifti(tmp_path / "nope.nii.gz")


def test_not_a_nifti(tmp_path):
    p = tmp_path / "x.nii.gz"
    p.write_text("hello, I am a CSV")
    with pytest.raises(InputError, match=r"x\.nii\.gz: not a readable NIfTI"):
        read_nifti(p)


def test_truncated_nifti(tmp_path):
    image, _ = blob_subject()
    p = write_nifti(tmp_path / "t.nii.gz", image)
    raw = gzip.decompress(p.read_bytes())
    p.write_bytes(gzip.compress(raw[: len(raw) // 2]))
    with pytest.raises(InputError, match=r"t\.nii\.gz: .*(truncated|not a readable)"):
        read_nifti(p)


def test_truncated_uncompressed_nifti(tmp_path):
    image, _ = blob_subject()
    p = write_nifti(tmp_path / "t.nii", image)
    p.write_bytes(p.read_bytes()[:1000])
    with pytest.raises(InputError, match=r"t\.nii: "):
        read_nifti(p)


def test_2d_and_4d_images_are_rejected(tmp_path):
    with pytest.raises(InputError, match=r"expected a 3D volume, got shape \(10, 12\)"):
        read_nifti(write_nifti(tmp_path / "a.nii", np.zeros((10, 12), np.float32)))
    with pytest.raises(InputError, match=r"expected a 3D volume, got shape \(4, 4, 4, 3\)"):
        read_nifti(write_nifti(tmp_path / "b.nii", np.zeros((4, 4, 4, 3), np.float32)))
    data, _ = read_nifti(write_nifti(tmp_path / "c.nii", np.ones((4, 5, 6, 1), np.float32)))
    assert data.shape == (4, 5, 6)  # a trailing singleton axis is fine


def test_nan_and_inf_voxels_are_rejected(tmp_path):
    arr = np.ones((6, 6, 6), np.float32)
    arr[1, 2, 3] = np.nan
    arr[4, 4, 4] = np.inf
    with pytest.raises(InputError, match=r"n\.nii: 2 NaN/inf voxels"):
        read_nifti(write_nifti(tmp_path / "n.nii", arr))


def test_mask_shape_and_affine_mismatch(tmp_path):
    image, mask = blob_subject()
    ip = write_nifti(tmp_path / "i.nii", image)
    data, affine = read_nifti(ip)
    bad_shape = write_nifti(tmp_path / "m1.nii", mask[:-1])
    with pytest.raises(InputError, match=r"m1\.nii: mask shape .* does not match image"):
        read_label_map(bad_shape, like=(data, affine, ip))
    shifted = np.eye(4)
    shifted[0, 3] = 1.0
    bad_aff = write_nifti(tmp_path / "m2.nii", mask, shifted)
    with pytest.raises(InputError, match=r"m2\.nii: mask affine does not match image"):
        read_label_map(bad_aff, like=(data, affine, ip))


def test_mask_with_non_integer_or_negative_values(tmp_path):
    with pytest.raises(InputError, match="non-integer"):
        read_label_map(write_nifti(tmp_path / "f.nii", np.full((4, 4, 4), 0.5, np.float32)))
    with pytest.raises(InputError, match="negative"):
        read_label_map(write_nifti(tmp_path / "g.nii", np.full((4, 4, 4), -1, np.int16)))
