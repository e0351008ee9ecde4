"""Masks -> per-tumor records.

Three kinds of mask become an *instance mask* (voxel value = tumor_id, 0 = background):
- an instance mask is used as it is;
- a binary mask (0/1) is split into 26-connected components; tumor_id 1 is the largest
  component, 2 the next, ... (ties: the one whose first voxel in C order comes first);
- a multi-label mask such as BraTS (1 NETC, 2 SNFH, 3 ET) keeps its tumor values (default
  {1, 3}: necrosis + enhancing tumor, the radiosurgical target; oedema is not tumor), then is
  split into components as a binary mask.

Measurements, in world millimetres of the scan:
- bbox_mm: the box covering the tumor's voxels; centroid_mm: mean of voxel centres;
- volume_ml: voxel count x voxel volume / 1000;
- size_mm, the tumor's linear size: the equivalent-sphere diameter (6 V / pi)^(1/3), V in mm^3.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from .boxes import box_mm_extent, box_mm_to_voxels, box_to_mm, make_box, voxel_to_mm
from .errors import InputError

CONNECTIVITY_26 = np.ones((3, 3, 3), dtype=bool)


@dataclass(frozen=True, kw_only=True)
class Tumor:
    scan_id: str
    tumor_id: int
    bbox: np.ndarray  # (6,) int voxel box, half-open, in the working grid
    bbox_mm: np.ndarray  # (6,) world mm: min xyz, max xyz
    centroid_mm: np.ndarray  # (3,) world mm
    volume_ml: float
    size_mm: float  # equivalent-sphere diameter
    labels: Mapping[str, int] = field(default_factory=dict)  # task -> class index, -1 missing


def tumor_extent(tumor: Tumor, affine: np.ndarray, shape) -> np.ndarray:
    """A tumor's box as its mask measures it, in voxels of the working grid (`affine`, `shape`) per axis,
    continuous: the extent of its box in millimetres on the scan's own grid (`bbox_mm`), not of the
    working grid's voxels that cover it (`bbox`, up to one voxel more on each side where the grids
    differ). What the `box_log_volume` part reads (nineteenth round), as a drawn box's own extent is."""
    return box_mm_extent(tumor.bbox_mm, affine, shape)


def equivalent_diameter_mm(volume_mm3: float) -> float:
    return float((6.0 * volume_mm3 / np.pi) ** (1.0 / 3.0))


DARK_CONTRAST = 0.3  # a tumor whose mean intensity is at most this above its shell's (z-scored scan) is dark


def tumor_contrast(image: np.ndarray, instances: np.ndarray, tumor_id: int, bbox, *, shell: int = 2) -> float:
    """A tumor's mean intensity minus that of the background in a `shell`-voxel shell around it (the
    scan's own units: z-scores for a normalized scan); nan where it has no voxel or no shell."""
    lo = np.maximum(np.asarray(bbox[:3], int) - shell - 1, 0)
    hi = np.asarray(bbox[3:], int) + shell + 1
    box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    inside = np.asarray(instances[box]) == tumor_id
    around = ndimage.binary_dilation(inside, iterations=shell) & ~inside & (np.asarray(instances[box]) == 0)
    if not inside.any() or not around.any():
        return float("nan")
    values = np.asarray(image[box], dtype=np.float64)
    return float(values[inside].mean() - values[around].mean())


def is_dark(image: np.ndarray, instances: np.ndarray, tumor_id: int, bbox) -> bool:
    """Whether a tumor is darker than the tissue around it, or hardly brighter (DARK_CONTRAST)."""
    return bool(tumor_contrast(image, instances, tumor_id, bbox) <= DARK_CONTRAST)


def instances_from_binary(mask: np.ndarray, *, min_voxels: int = 1) -> np.ndarray:
    """Binary mask -> instance mask, ids by decreasing component size (see module doc)."""
    comp, n = ndimage.label(mask > 0, structure=CONNECTIVITY_26)
    if n == 0:
        return comp.astype(np.int32)
    sizes = np.bincount(comp.ravel())[1:]
    first = ndimage.minimum(np.arange(comp.size).reshape(comp.shape), comp, index=np.arange(1, n + 1))
    order = np.lexsort((np.asarray(first), -sizes))  # largest first, then earliest voxel
    new_id = np.zeros(n + 1, dtype=np.int32)
    keep = [c for c in order if sizes[c] >= min_voxels]
    new_id[np.asarray(keep, dtype=int) + 1] = np.arange(1, len(keep) + 1, dtype=np.int32)
    return new_id[comp]


def tumor_mask_from_labels(
    seg: np.ndarray, *, tumor_values: Iterable[int], allowed_values: Iterable[int], where: str = "mask"
) -> np.ndarray:
    """Multi-label segmentation -> binary tumor mask; a value outside `allowed_values` raises."""
    allowed = set(int(v) for v in allowed_values) | {0}
    present = set(np.unique(seg).astype(int).tolist())
    unknown = sorted(present - allowed)
    if unknown:
        raise InputError(f"{where}: unknown label value(s) {unknown}; expected only {sorted(allowed)}", kind="bad_mask")
    return np.isin(seg, list(tumor_values))


def measure_tumors(
    instances: np.ndarray,
    affine: np.ndarray,
    *,
    scan_id: str,
    grid_affine: np.ndarray | None = None,
    grid_shape=None,
    tumor_ids: Iterable[int] | None = None,
    labels: Mapping[int, Mapping[str, int]] | None = None,
    where: str = "mask",
) -> list[Tumor]:
    """Instance mask (on the grid `affine`) -> Tumor records.

    Measurements come from this (native) grid; `bbox` is given on the working grid
    (`grid_affine`, `grid_shape`; default: this grid). `tumor_ids` restricts and orders the
    result; an id absent from the mask raises.
    """
    present = np.unique(instances)
    present = present[present > 0]
    ids = [int(i) for i in (present if tumor_ids is None else tumor_ids)]
    missing = sorted(set(ids) - set(present.tolist()))
    if missing:
        raise InputError(f"{where}: tumor_id {missing} not found in the mask (it holds ids {present.tolist()})",
                         kind="mismatch")
    if not ids:
        return []
    voxel_ml = abs(np.linalg.det(affine[:3, :3])) / 1000.0
    slices = ndimage.find_objects(instances, max_label=int(max(ids)))
    counts = np.bincount(instances.ravel(), minlength=max(ids) + 1)[ids]
    centers = ndimage.center_of_mass(np.ones(instances.shape, dtype=np.float32), instances, index=ids)
    g_affine = affine if grid_affine is None else grid_affine
    g_shape = instances.shape if grid_shape is None else grid_shape
    out = []
    for tid, count, center in zip(ids, counts, centers, strict=True):
        sl = slices[tid - 1]
        box = make_box([s.start for s in sl], [s.stop for s in sl])
        bbox_mm = box_to_mm(box, affine)
        volume_ml = float(count) * voxel_ml
        out.append(
            Tumor(
                scan_id=scan_id,
                tumor_id=tid,
                bbox=box if grid_affine is None else box_mm_to_voxels(bbox_mm, g_affine, g_shape),
                bbox_mm=bbox_mm,
                centroid_mm=voxel_to_mm(np.asarray(center), affine),
                volume_ml=volume_ml,
                size_mm=equivalent_diameter_mm(volume_ml * 1000.0),
                labels=dict((labels or {}).get(tid, {})),
            )
        )
    return out
