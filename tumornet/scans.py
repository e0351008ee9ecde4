"""Loading one scan of a manifest: image + instance mask on the working grid, labelled Tumor records."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .errors import InputError
from .manifest import ManifestRow
from .tumors import Tumor, instances_from_binary, measure_tumors
from .volumes import Volume, as_spacing, normalize_intensity, read_label_map, read_nifti, resample, spacing_of


@dataclass(frozen=True, kw_only=True)
class Scan:
    """A scan ready for training / embedding: volume, instance mask on its grid, tumor records."""

    volume: Volume
    instances: np.ndarray  # (X, Y, Z) int32, tumor ids on the volume's grid
    tumors: tuple[Tumor, ...]


def read_instances(first: ManifestRow, like=None) -> tuple[np.ndarray, np.ndarray]:
    """A scan's mask as an instance mask (applying `tumor_values`) on its native grid -> (mask, affine)."""
    mask, affine = read_label_map(first.mask, like=like)
    if first.tumor_values is not None:
        mask = instances_from_binary(np.isin(mask, first.tumor_values))
    return mask, affine


def _on_grid(data: np.ndarray, affine: np.ndarray, spacing, scan_id: str, normalize: bool) -> Volume:
    """An image resampled to the working grid (linear) and, by default, brain-normalized."""
    image, grid = resample(data, affine, spacing, order=1)
    if normalize:
        image = normalize_intensity(image)
    return Volume(array=image.astype(np.float32), spacing_mm=spacing_of(grid), affine=grid, scan_id=scan_id)


def load_image(path, scan_id: str, *, spacing_mm=None, normalize: bool = True) -> Volume:
    """One scan's image alone, resampled to the working grid and normalized (a scan without a mask)."""
    data, affine = read_nifti(path)
    return _on_grid(data, affine, as_spacing(spacing_mm), scan_id, normalize)


def load_scan(rows: Sequence[ManifestRow], *, spacing_mm=None, normalize: bool = True) -> Scan:
    """Load one scan's image and mask (rows of one scan_id) -> Scan with labelled Tumor records.

    Tumor measurements come from the mask on its native grid (exact volumes); boxes are given on
    the resampled working grid.
    """
    first = rows[0]
    if first.mask is None:
        raise InputError(f"{first.image}: this scan has no mask (manifest row {first.row})", kind="no_mask")
    data, affine = read_nifti(first.image)
    mask, _ = read_instances(first, like=(data, affine, first.image))
    if not (mask > 0).any():
        raise InputError(f"{first.mask}: empty mask (no tumor voxel)", kind="empty_mask")
    spacing = as_spacing(spacing_mm)
    volume = _on_grid(data, affine, spacing, first.scan_id, normalize)
    instances, _ = resample(mask, affine, spacing, order=0)
    tumors = measure_tumors(
        mask, affine, scan_id=first.scan_id, grid_affine=volume.affine, grid_shape=volume.shape,
        tumor_ids=[r.tumor_id for r in rows], labels={r.tumor_id: r.labels for r in rows},
        where=f"{first.mask} (manifest rows {[r.row for r in rows]})",
    )
    return Scan(volume=volume, instances=instances.astype(np.int32), tumors=tuple(tumors))
