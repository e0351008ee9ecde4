"""NIfTI -> canonical RAS, target spacing, normalized float32 `Volume`.

Reading: nibabel (.nii, .nii.gz); the scaled data (scl_slope / scl_inter applied) as float32; the
image is reoriented to the closest canonical RAS orientation (array axes = +x right, +y anterior,
+z superior), then resampled to the target spacing on a grid covering the same physical extent.
Images are resampled linearly (Gaussian anti-aliasing when downsampling), label maps by nearest
neighbour. The affine is kept, so any voxel maps to world (scanner) millimetres of the original.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from .errors import InputError

Spacing = tuple[float, float, float]


@dataclass(frozen=True, kw_only=True)
class Volume:
    """A scan ready for the network: array (X, Y, Z) float32 in canonical RAS voxel order."""

    array: np.ndarray
    spacing_mm: Spacing
    affine: np.ndarray
    scan_id: str

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.array.shape)


def as_spacing(spacing) -> Spacing | None:
    """None (keep native), a number (isotropic) or 3 numbers -> a 3-tuple of positive floats."""
    if spacing is None:
        return None
    s = np.broadcast_to(np.asarray(spacing, dtype=np.float64), (3,))
    if not np.all(np.isfinite(s)) or np.any(s <= 0):
        raise InputError(f"spacing_mm must be positive numbers, got {spacing!r}")
    return tuple(float(v) for v in s)


def spacing_of(affine: np.ndarray) -> Spacing:
    return tuple(float(v) for v in np.linalg.norm(affine[:3, :3], axis=0))


MAX_VOXELS = 2**30  # 1024^3: far above any clinical scan (a 0.5 mm whole head is about 10^8)


def check_data_size(path: Path, img) -> None:
    """Before any voxel is read: the header's voxel count is plausible and the file holds that many
    bytes (uncompressed .nii: the file size; .nii.gz: the gzip trailer's uncompressed size, mod 2^32)."""
    shape = tuple(int(v) for v in img.header.get_data_shape())
    n = int(np.prod(shape, dtype=np.float64)) if shape else 0
    if n > MAX_VOXELS:
        raise InputError(f"{path}: the header claims {' x '.join(map(str, shape))} voxels ({n:.3g}), more than any "
                         f"scan ({MAX_VOXELS:.3g}); the header is corrupt", kind="header_size")
    need = int(img.header.get_data_offset()) + n * img.header.get_data_dtype().itemsize
    size = path.stat().st_size
    if str(path).endswith(".gz"):
        with open(path, "rb") as f:
            f.seek(-4, 2)
            isize = int.from_bytes(f.read(4), "little")  # uncompressed size mod 2^32 (RFC 1952)
        if size < 18 or (isize < need % 2**32 and need < 2**32):
            raise InputError(f"{path}: the header needs {need} bytes of data but the compressed file holds {isize} "
                             "(truncated, or a header that disagrees with the data)", kind="header_size")
    elif size < need:
        raise InputError(f"{path}: the header needs {need} bytes but the file has {size} (truncated, or a header that "
                         "disagrees with the data)", kind="header_size")


def read_nifti(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a 3D NIfTI as (float32 data in canonical RAS, its affine); every problem names the file."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found", kind="missing_file")
    if path.stat().st_size == 0:
        raise InputError(f"{path}: empty file (0 bytes)", kind="not_nifti")
    try:
        img = nib.load(str(path))
    except Exception as e:  # nibabel raises several types for non-NIfTI input
        raise InputError(f"{path}: not a readable NIfTI file ({type(e).__name__}: {e})", kind="not_nifti") from None
    if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
        raise InputError(f"{path}: not a NIfTI image (nibabel read it as {type(img).__name__})", kind="not_nifti")
    check_data_size(path, img)
    shape = img.shape
    if len(shape) == 4 and shape[3] == 1:
        img = img.slicer[..., 0]
        shape = img.shape
    if len(shape) != 3:
        raise InputError(f"{path}: expected a 3D volume, got shape {tuple(shape)} ({len(shape)}D)", kind="bad_shape")
    if min(shape) < 1:
        raise InputError(f"{path}: empty volume of shape {tuple(shape)}", kind="bad_shape")
    affine = img.affine
    if affine is None or not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise InputError(f"{path}: invalid (singular or non-finite) affine", kind="bad_affine")
    try:  # reorienting reads the voxels too
        img = nib.as_closest_canonical(img)
        data = np.asarray(img.get_fdata(dtype=np.float32))
    except (OSError, EOFError, ValueError, zlib.error) as e:
        raise InputError(f"{path}: truncated or corrupt voxel data ({type(e).__name__}: {e})",
                         kind="truncated") from None
    bad = ~np.isfinite(data)
    if bad.any():
        raise InputError(f"{path}: {int(bad.sum())} NaN/inf voxels (first at voxel {np.argwhere(bad)[0].tolist()})",
                         kind="non_finite")
    return data, img.affine.copy()


def resample(array: np.ndarray, affine: np.ndarray, spacing: Spacing | None, *, order: int):
    """Resample to `spacing` on a grid covering the same physical extent -> (array, affine)."""
    if spacing is None:
        return array, affine
    old = np.asarray(spacing_of(affine))
    zoom = np.asarray(spacing) / old  # new voxel size in old voxels
    if np.allclose(zoom, 1.0, atol=1e-4):
        return array, affine
    shape = np.maximum(np.round(np.asarray(array.shape) / zoom), 1).astype(int)
    offset = 0.5 * zoom - 0.5  # old index of new voxel 0's centre: grids share the outer corner
    src = array
    if order > 0 and np.any(zoom > 1):
        src = ndimage.gaussian_filter(array, sigma=np.maximum(zoom - 1, 0) / 2, mode="nearest")
    out = ndimage.affine_transform(
        src, zoom, offset=offset, output_shape=tuple(shape), order=order, mode="nearest", prefilter=False
    )
    scale = np.eye(4)
    scale[:3, :3] = np.diag(zoom)
    scale[:3, 3] = offset
    return out.astype(array.dtype, copy=False), affine @ scale


def normalize_intensity(array: np.ndarray) -> np.ndarray:
    """Robust, brain-aware z-score.

    Foreground = voxels above the image mean with holes filled (a head/brain mask that works
    for skull-stripped and whole-head T1 alike); intensities are clipped to the foreground's 0.5th
    and 99.9th percentiles, then standardized by the foreground's mean and standard deviation.
    Background ends at the clipped minimum's z-score.
    """
    fg = ndimage.binary_fill_holes(array > array.mean())
    values = array[fg] if fg.sum() >= 64 else array.ravel()
    lo, hi = np.percentile(values, [0.5, 99.9])
    clipped = np.clip(array, lo, hi)
    v = clipped[fg] if fg.sum() >= 64 else clipped.ravel()
    sd = float(v.std()) or 1.0
    return ((clipped - float(v.mean())) / sd).astype(np.float32)


def foreground_voxels(array: np.ndarray, *, limit: int = 200_000) -> np.ndarray:
    """(n, 3) voxel indices of the head / brain foreground: voxels above the image mean with holes
    filled (subsampled to about `limit` points)."""
    vox = np.argwhere(ndimage.binary_fill_holes(array > array.mean()))
    if len(vox) < 64:
        raise InputError("the image has (almost) no foreground (no head or brain above the mean intensity)",
                         kind="empty_image")
    return vox[:: len(vox) // limit] if len(vox) > limit else vox


def head_box_voxels(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Robust foreground box of a (normalized or raw) scan in voxels -> (centre, half size) per axis:
    voxels above the mean with holes filled, 0.5-99.5th coordinate percentiles."""
    lo, hi = np.percentile(foreground_voxels(image), [0.5, 99.5], axis=0)
    return (lo + hi) / 2.0, np.maximum((hi - lo) / 2.0, 1.0)


def load_volume(path: str | Path, *, scan_id: str, spacing_mm=None, normalize: bool = True) -> Volume:
    data, affine = read_nifti(path)
    data, affine = resample(data, affine, as_spacing(spacing_mm), order=1)
    if normalize:
        data = normalize_intensity(data)
    return Volume(array=data.astype(np.float32), spacing_mm=spacing_of(affine), affine=affine, scan_id=scan_id)


def read_label_map(path: str | Path, *, like: tuple[np.ndarray, np.ndarray, str | Path] | None = None):
    """Read an integer-valued mask (canonical RAS, native grid) -> (int32 array, affine).

    With `like=(image_array, image_affine, image_path)` from `read_nifti`, the mask must share the
    image's shape and affine (within 1e-3 mm).
    """
    data, affine = read_nifti(path)
    rounded = np.rint(data)
    if not np.allclose(data, rounded, atol=1e-3):
        raise InputError(f"{path}: mask has non-integer values (e.g. {data[data != rounded].flat[0]:.4g})",
                         kind="bad_mask")
    if rounded.min() < 0:
        raise InputError(f"{path}: mask has negative values (min {int(rounded.min())})", kind="bad_mask")
    if like is not None:
        image, image_affine, image_path = like
        if image.shape != data.shape:
            raise InputError(f"{path}: mask shape {data.shape} does not match image {image_path} shape {image.shape}",
                             kind="mismatch")
        if not np.allclose(image_affine, affine, atol=1e-3):
            raise InputError(
                f"{path}: mask affine does not match image {image_path} affine "
                f"(max difference {np.abs(image_affine - affine).max():.3g} mm)",
                kind="mismatch",
            )
    return rounded.astype(np.int32), affine


def save_nifti(path: str | Path, array: np.ndarray, affine: np.ndarray, *, axcodes: str = "RAS", dtype=None) -> Path:
    """Write a canonical-RAS array as NIfTI stored in the orientation `axcodes` (e.g. "LPS").

    With an integer `dtype`, integer-valued data is stored as is; other float data is scaled by
    nibabel, which stores scl_slope / scl_inter.
    """
    ornt = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"),
                                           nib.orientations.axcodes2ornt(tuple(axcodes)))
    data = nib.orientations.apply_orientation(array, ornt)
    if dtype is not None and np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        if np.array_equal(data, np.rint(data)) and data.min() >= info.min and data.max() <= info.max:
            data = data.astype(dtype)  # integer labels stay exact: no scl_slope
    new_affine = affine @ nib.orientations.inv_ornt_aff(ornt, array.shape)
    img = nib.Nifti1Image(data, new_affine)
    img.set_qform(new_affine, code=1)
    img.set_sform(new_affine, code=1)
    if dtype is not None:
        img.set_data_dtype(dtype)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))
    return path
