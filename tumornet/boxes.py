"""Bounding boxes as small pure functions over immutable arrays (style of deep_pipe's im/box.py).

A voxel box is an int64 array of 6 numbers `(lo0, lo1, lo2, hi0, hi1, hi2)`, half-open, in the
array's axis order (for canonical RAS volumes: x, y, z). A millimetre box is a float64 array of 6
numbers `(min_x, min_y, min_z, max_x, max_y, max_z)` in world (scanner RAS) millimetres, covering
the voxels' full extent (voxel centre +- half a voxel). Every function returns a new read-only array.
"""

from __future__ import annotations

import itertools

import numpy as np

from .errors import InputError


def _frozen(a: np.ndarray) -> np.ndarray:
    a = np.array(a)
    a.flags.writeable = False
    return a


def make_box(lo, hi) -> np.ndarray:
    lo, hi = np.asarray(lo, dtype=np.int64), np.asarray(hi, dtype=np.int64)
    if lo.shape != (3,) or hi.shape != (3,):
        raise ValueError(f"box corners must have 3 coordinates, got {lo.shape} and {hi.shape}")
    return _frozen(np.concatenate([lo, hi]))


def box_lo(box) -> np.ndarray:
    return np.asarray(box)[:3]


def box_hi(box) -> np.ndarray:
    return np.asarray(box)[3:]


def box_size(box) -> np.ndarray:
    """Extent in voxels per axis (0 where the box is empty)."""
    return np.maximum(box_hi(box) - box_lo(box), 0)


def box_center(box) -> np.ndarray:
    """Centre in continuous voxel coordinates (voxel centres are integers)."""
    return (box_lo(box) + box_hi(box) - 1) / 2.0


def is_empty(box) -> bool:
    return bool(np.any(box_size(box) == 0))


def ellipsoid_voxels(box, *, max_points: int = 2000) -> np.ndarray:
    """Voxel centres (n, 3) of the ellipsoid inscribed in a non-empty box: the tumor a box alone
    suggests. A regular stride per axis keeps at most about `max_points`; the centre voxel is always in."""
    lo, size = box_lo(box).astype(np.float64), np.maximum(box_size(box), 1).astype(np.float64)
    stride = max(1, int(np.ceil((np.prod(size) * np.pi / 6 / max_points) ** (1 / 3))))
    centre = lo + (size - 1) / 2.0
    axes = [np.unique(np.concatenate([np.arange(c, lo[a] - 1e-9, -stride), np.arange(c, lo[a] + size[a], stride)]))
            for a, c in enumerate(np.floor(centre))]
    pts = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
    inside = (((pts + 0.5 - lo - size / 2.0) / (size / 2.0)) ** 2).sum(1) <= 1.0
    return pts[inside] if inside.any() else np.floor(centre)[None]


def box_from_mask(mask: np.ndarray) -> np.ndarray:
    """Smallest half-open box holding every nonzero voxel; raises on an empty mask."""
    if mask.ndim != 3:
        raise ValueError(f"mask must be 3D, got shape {mask.shape}")
    lo, hi = [], []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        nz = np.flatnonzero(np.any(mask, axis=other))
        if nz.size == 0:
            raise InputError("empty mask: no nonzero voxel to put a box around")
        lo.append(nz[0])
        hi.append(nz[-1] + 1)
    return make_box(lo, hi)


def add_margin(box, margin) -> np.ndarray:
    """Grow (or, with a negative margin, shrink) by `margin` voxels on every side."""
    m = np.broadcast_to(np.asarray(margin, dtype=np.int64), (3,))
    return make_box(box_lo(box) - m, box_hi(box) + m)


def clip_box(box, shape) -> np.ndarray:
    """Intersect with the array `[0, shape)`; an outside box becomes empty (lo == hi)."""
    shape = np.asarray(shape, dtype=np.int64)
    lo = np.clip(box_lo(box), 0, shape)
    hi = np.clip(box_hi(box), lo, shape)
    return make_box(lo, hi)


def shift_box(box, offset) -> np.ndarray:
    off = np.asarray(offset, dtype=np.int64)
    return make_box(box_lo(box) + off, box_hi(box) + off)


def box_slices(box) -> tuple[slice, slice, slice]:
    return tuple(slice(int(a), int(b)) for a, b in zip(box_lo(box), box_hi(box), strict=True))


def contains(outer, inner) -> bool:
    return bool(np.all(box_lo(outer) <= box_lo(inner)) and np.all(box_hi(inner) <= box_hi(outer)))


def overlaps(a, b) -> bool:
    """Whether two half-open boxes share a voxel."""
    a, b = np.asarray(a), np.asarray(b)
    return bool(np.all(a[:3] < b[3:]) and np.all(b[:3] < a[3:]))


def _corners(lo, hi) -> np.ndarray:
    return np.array(list(itertools.product(*zip(lo, hi, strict=True))), dtype=np.float64)  # (8, 3)


def _apply(affine: np.ndarray, points: np.ndarray) -> np.ndarray:
    return points @ affine[:3, :3].T + affine[:3, 3]


def box_to_mm(box, affine: np.ndarray) -> np.ndarray:
    """Voxel box -> world millimetre box covering the voxels' full extent."""
    corners = _apply(affine, _corners(box_lo(box) - 0.5, box_hi(box) - 0.5))
    return _frozen(np.concatenate([corners.min(0), corners.max(0)]))


def box_mm_to_voxels(box_mm, affine: np.ndarray, shape=None, *, tol: float = 1e-3) -> np.ndarray:
    """World millimetre box -> smallest voxel box of the grid `affine` whose voxels cover it."""
    box_mm = np.asarray(box_mm, dtype=np.float64)
    corners = _apply(np.linalg.inv(affine), _corners(box_mm[:3], box_mm[3:]))
    lo = np.floor(corners.min(0) + 0.5 + tol)
    hi = np.ceil(corners.max(0) + 0.5 - tol)
    box = make_box(lo, np.maximum(hi, lo + 1))
    return box if shape is None else clip_box(box, shape)


def grown_box_mm(box_mm, share: float) -> np.ndarray:
    """A millimetre box with each side `share` larger (or smaller, below 0) about its centre: a box drawn
    around a tumor the way a user might, too large (the box query benchmarks, the demo's box query)."""
    box_mm = np.asarray(box_mm, dtype=np.float64)
    centre, half = (box_mm[:3] + box_mm[3:]) / 2, (box_mm[3:] - box_mm[:3]) / 2 * (1 + share)
    return _frozen(np.concatenate([centre - half, centre + half]))


def box_mm_extent(box_mm, affine: np.ndarray, shape) -> np.ndarray:
    """World millimetre box -> its own extent per array axis in voxels of the grid `affine` (continuous,
    clipped to the array): what a drawn box measures, where box_mm_to_voxels gives the voxels that
    cover it (up to one voxel more on each side: a 10 mm box on a 2 mm grid can cover 14 mm)."""
    box_mm = np.asarray(box_mm, dtype=np.float64)
    corners = _apply(np.linalg.inv(affine), _corners(box_mm[:3], box_mm[3:]))
    top = np.asarray(shape, dtype=np.float64) - 0.5
    return np.maximum(np.clip(corners.max(0), -0.5, top) - np.clip(corners.min(0), -0.5, top), 0.0)


def voxel_to_mm(points, affine: np.ndarray) -> np.ndarray:
    """(..., 3) continuous voxel coordinates -> world millimetres."""
    p = np.asarray(points, dtype=np.float64)
    return _apply(affine, p.reshape(-1, 3)).reshape(p.shape)


def mm_to_voxel(points, affine: np.ndarray) -> np.ndarray:
    p = np.asarray(points, dtype=np.float64)
    return _apply(np.linalg.inv(affine), p.reshape(-1, 3)).reshape(p.shape)


def distort_box(box, rng: np.random.Generator, *, log2_scale_sd: float = 1 / 3, shift_sd: float = 0.1):
    """Paper eq. 2: a box as a sloppy user would draw it.

    Per axis: size *= 2**N(0, log2_scale_sd); centre += size * N(0, shift_sd). The result has at
    least one voxel per axis; it is not clipped (callers clip to their array).
    """
    size = box_size(box).astype(np.float64)
    center = (box_lo(box) + box_hi(box)) / 2.0
    new_size = size * np.exp2(rng.normal(0.0, log2_scale_sd, 3))
    new_center = center + size * rng.normal(0.0, shift_sd, 3)
    lo = np.round(new_center - new_size / 2.0)
    hi = np.maximum(np.round(new_center + new_size / 2.0), lo + 1)
    return make_box(lo, hi)
