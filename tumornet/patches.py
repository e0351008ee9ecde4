"""Training samples: patches that contain a whole tumor, and their augmentation.

A patch is a cube of `size` voxels of the working grid, placed at random so that the chosen
tumor's box lies wholly inside (when the box is larger than the patch, the patch is centred on
it and the box clipped). Every tumor whose box lies wholly inside the patch is supervised by the
task heads; the segmentation target covers the whole patch. Parts of a patch outside the volume
are filled with the volume's minimum (its background). Boxes are then in patch coordinates.

Augmentation (training only): a left-right flip with probability 1/2 that also swaps the
`left_right` label (no other flip: the anatomy labels front/rear and upper/lower are not
symmetric), and a random intensity scale and shift. `distort_box` (paper eq. 2) can jitter the
boxes given to RoiPool.

Every patch carries its coordinate frame (`patch_frame`): where its voxels lie in the head, for
networks that read coordinate channels (`model.coords`). The head's robust foreground box spans
[-1, 1] per axis of the canonical RAS grid, so the frame means the same in a scan of any
orientation, spacing, field of view or head size; a left-right flip mirrors it (x -> -x).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from .boxes import box_hi, box_lo, distort_box, make_box, shift_box
from .labels import MISSING
from .volumes import head_box_voxels


@dataclass(frozen=True, kw_only=True)
class TumorBox:
    """What a patch needs of a tumor: its box on the working grid and its labels."""

    tumor_id: int
    bbox: np.ndarray  # (6,) voxel box, half-open
    labels: Mapping[str, int]
    extent: np.ndarray | None = None  # (3,) its mask's box in voxels, continuous (tumornet.tumors.tumor_extent)


@dataclass(frozen=True, kw_only=True)
class Sample:
    image: np.ndarray  # (1, P, P, P) float32
    seg: np.ndarray  # (P, P, P) int64: 1 tumor, 0 background
    boxes: np.ndarray  # (n, 6) int64, patch coordinates
    labels: dict[str, np.ndarray]  # task -> (n,) int64, -1 missing
    frame: np.ndarray  # (6,) float32: the patch's coordinate frame (patch_frame)


@dataclass(frozen=True, kw_only=True)
class Augment:
    flip_lr: bool = True
    intensity_scale: float = 0.1  # x U(1 - s, 1 + s)
    intensity_shift: float = 0.1  # + U(-s, s), in z-score units
    box_jitter: bool = False  # paper eq. 2 on the RoiPool boxes


def patch_origin(box, shape, size: int, rng: np.random.Generator | None) -> np.ndarray:
    """Corner of a `size`-cube holding `box` (random placement; centred when rng is None)."""
    lo, hi = box_lo(box), box_hi(box)
    extent = np.asarray(shape)
    origin = np.empty(3, dtype=np.int64)
    for a in range(3):
        first, last = hi[a] - size, lo[a]  # range of origins keeping the box inside
        if first > last:  # box larger than the patch: centre on it
            origin[a] = (lo[a] + hi[a] - size) // 2
            continue
        # prefer origins that also stay inside the volume
        first_v, last_v = max(first, 0), min(last, extent[a] - size)
        if first_v <= last_v:
            first, last = first_v, last_v
        origin[a] = (first + last) // 2 if rng is None else rng.integers(first, last + 1)
    return origin


def crop(array: np.ndarray, origin, size, fill) -> np.ndarray:
    """array[origin : origin + size] per axis (size: one int or one per axis), padded with `fill`
    where it leaves the array."""
    origin = np.asarray(origin)
    size = np.broadcast_to(np.asarray(size, dtype=int), 3)
    out = np.full(tuple(size), fill, dtype=array.dtype)
    src_lo = np.maximum(origin, 0)
    src_hi = np.minimum(origin + size, array.shape)
    if np.any(src_hi <= src_lo):
        return out
    dst_lo = src_lo - origin
    dst_hi = dst_lo + (src_hi - src_lo)
    out[tuple(slice(a, b) for a, b in zip(dst_lo, dst_hi, strict=True))] = array[
        tuple(slice(a, b) for a, b in zip(src_lo, src_hi, strict=True))]
    return out


def _inside_patch(box, size: int) -> np.ndarray:
    """Clip to [0, size) keeping at least one voxel per axis."""
    lo = np.clip(box_lo(box), 0, size - 1)
    return make_box(lo, np.clip(box_hi(box), lo + 1, size))


def patch_size_for(bbox, trained: int) -> int:
    """The training patch size, or the tumor's largest extent + 8 voxels of context, rounded up to x4."""
    need = int(np.max(box_hi(bbox) - box_lo(bbox))) + 8
    return max(trained, -(-need // 4) * 4)


def patch_frame(origin, head) -> np.ndarray:
    """The coordinate frame of a patch whose first voxel is `origin` (voxels of the scan), with the
    scan's head box `head` = (centre, half size) (volumes.head_box_voxels): (start (3), step (3)),
    so that voxel i of axis a lies at start[a] + i * step[a] in head units."""
    centre, half = (np.asarray(v, dtype=np.float64) for v in head)
    return np.concatenate([(np.asarray(origin, dtype=np.float64) - centre) / half, 1.0 / half]).astype(np.float32)


def mirrored_frame(frame: np.ndarray, size: int) -> np.ndarray:
    """The frame of a patch of `size` voxels flipped left-right (axis 0): the mirror image of the
    head, x -> -x."""
    out = np.array(frame, dtype=np.float32)
    out[0] = -(frame[0] + (size - 1) * frame[3])
    return out


def centred_patch(image: np.ndarray, bbox, size: int, head=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The deterministic patch around one box (as for validation) -> (image (1, P, P, P) float32,
    the box in patch coordinates, the patch's frame); head: the scan's head box (found when None)."""
    origin = patch_origin(bbox, image.shape, size, None)
    img = crop(image, origin, size, float(image.min()))
    frame = patch_frame(origin, head_box_voxels(image) if head is None else head)
    return img[None].astype(np.float32), _inside_patch(shift_box(bbox, -origin), size), frame


def make_sample(image: np.ndarray, instances: np.ndarray, tumors: Sequence[TumorBox], index: int | None, size: int,
                rng: np.random.Generator | None, tasks: Sequence[str], augment: Augment | None = None,
                head=None) -> Sample:
    """The patch around tumor `index` of a scan (rng None: centred, deterministic, no augmentation);
    index None: a patch anywhere in the scan (rng needed), holding the tumors that lie wholly inside
    it, maybe none. head: the scan's head box for the patch's frame (found when None)."""
    if index is None:
        origin = np.array([rng.integers(0, max(n - size, 0) + 1) for n in image.shape], dtype=np.int64)
    else:
        origin = patch_origin(tumors[index].bbox, image.shape, size, rng)
    img = crop(image, origin, size, float(image.min()))
    frame = patch_frame(origin, head_box_voxels(image) if head is None else head)
    seg = (crop(instances, origin, size, 0) > 0).astype(np.int64)
    patch_box = make_box(origin, origin + size)
    chosen = []
    for i, t in enumerate(tumors):
        inside = np.all(box_lo(t.bbox) >= box_lo(patch_box)) and np.all(box_hi(t.bbox) <= box_hi(patch_box))
        if inside or i == index:
            chosen.append((_inside_patch(shift_box(t.bbox, -origin), size), t.labels))
    boxes = np.stack([b for b, _ in chosen]).astype(np.int64) if chosen else np.zeros((0, 6), np.int64)
    labels = {k: np.array([lab.get(k, MISSING) for _, lab in chosen], dtype=np.int64) for k in tasks}
    if rng is not None and augment is not None:
        if augment.flip_lr and rng.random() < 0.5:
            img, seg, frame = img[::-1].copy(), seg[::-1].copy(), mirrored_frame(frame, size)
            boxes = np.concatenate([size - boxes[:, 3:4], boxes[:, 1:3], size - boxes[:, 0:1], boxes[:, 4:6]], axis=1)
            if "left_right" in labels:
                lr = labels["left_right"]
                labels["left_right"] = np.where(lr == MISSING, MISSING, 1 - lr)
        img = img * rng.uniform(1 - augment.intensity_scale, 1 + augment.intensity_scale) + rng.uniform(
            -augment.intensity_shift, augment.intensity_shift)
        if augment.box_jitter and len(boxes):
            boxes = np.stack([_inside_patch(distort_box(b, rng), size) for b in boxes])
    return Sample(image=img[None].astype(np.float32), seg=seg, boxes=boxes, labels=labels, frame=frame)


def collate(samples: Sequence[Sample]) -> dict:
    """-> numpy batch: image (B, 1, P, P, P), seg (B, P, P, P), boxes (N, 7) with batch index, labels,
    frame (B, 6)."""
    boxes = np.concatenate([np.concatenate([np.full((len(s.boxes), 1), b), s.boxes], axis=1)
                            for b, s in enumerate(samples)]).astype(np.int64)
    return {
        "image": np.stack([s.image for s in samples]),
        "seg": np.stack([s.seg for s in samples]),
        "boxes": boxes,
        "labels": {k: np.concatenate([s.labels[k] for s in samples]) for k in samples[0].labels},
        "frame": np.stack([s.frame for s in samples]),
    }
