"""Tumors found by the segmentation head, for scans without a mask (`source = predicted`).

Sliding-window inference over the whole scan on the model's working grid (the network is fully
convolutional): windows of `window` voxels per axis (an axis shorter than that is one window, its
length rounded up to a multiple of 4; at 2 mm a head is one window of 128) overlapping by `overlap`
(the last window of an axis flush with its end), the tumor probability (1 - P(background)) averaged
where windows overlap, thresholded, split into 26-connected components, and components under
`min_volume_ml` dropped. Each component becomes a Tumor record (tumor_id 1 = the largest), measured
on the working grid, without labels.
Pure torch / numpy: the embedding job and `search --image` call it per scan.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import torch

from .errors import InputError
from .patches import crop, patch_frame
from .tumors import Tumor, instances_from_binary, measure_tumors
from .volumes import Volume, head_box_voxels


@dataclass(frozen=True, kw_only=True)
class DetectConfig:
    """Config section `detect`: how tumors are found in a scan without a mask."""

    threshold: float = 0.5  # tumor probability above which a voxel is tumor
    min_volume_ml: float = 0.05  # smaller components are dropped (0.05 ml: a sphere of 4.6 mm)
    window: int = 128  # voxels per axis of one forward pass (memory: about 40 MB per 64^3 at C = 32)
    overlap: float = 0.25  # share of a window that the next one overlaps

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold < 1.0:
            raise InputError(f"detect.threshold: must be in (0, 1), got {self.threshold}")
        if self.min_volume_ml < 0:
            raise InputError(f"detect.min_volume_ml: must be >= 0, got {self.min_volume_ml}")
        if self.window < 16 or self.window % 4:
            raise InputError(f"detect.window: must be a multiple of 4 and >= 16, got {self.window}")
        if not 0.0 <= self.overlap < 1.0:
            raise InputError(f"detect.overlap: must be in [0, 1), got {self.overlap}")


def window_origins(length: int, size: int, overlap: float) -> list[int]:
    """Window starts along one axis of `length` voxels: every `size * (1 - overlap)`, the last one
    flush with the end (one window at 0 when the axis is not longer than a window)."""
    if length <= size:
        return [0]
    step = max(1, int(size * (1.0 - overlap)))
    starts = list(range(0, length - size, step))
    return [*starts, length - size]


@torch.no_grad()
def tumor_probability(model, image: np.ndarray, *, window: int = 128, overlap: float = 0.25) -> np.ndarray:
    """Sliding-window tumor probability of a normalized scan (X, Y, Z) -> float32 array of its shape."""
    size = [min(window, -(-n // 4) * 4) for n in image.shape]
    was_training = model.training
    model.eval()
    total = np.zeros(image.shape, np.float32)
    count = np.zeros(image.shape, np.float32)
    fill = float(image.min())
    head = head_box_voxels(image) if model.cfg.coords else None  # the windows' frames (coordinate channels)
    dummy = torch.tensor([[0, 0, 0, 0, 1, 1, 1]], dtype=torch.int64, device=model.device)  # heads unused
    try:
        for origin in itertools.product(*(window_origins(n, w, overlap) for n, w in zip(image.shape, size,
                                                                                          strict=True))):
            patch = crop(image, origin, size, fill)
            x = torch.from_numpy(patch[None, None].astype(np.float32)).to(model.device)
            frame = None if head is None else torch.from_numpy(patch_frame(origin, head)[None])
            seg = model(x, dummy, frame)["seg"][0].float()
            p = (1.0 - torch.softmax(seg, 0)[0]).cpu().numpy()
            lo = np.asarray(origin)
            hi = np.minimum(lo + size, image.shape)
            dst = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
            total[dst] += p[tuple(slice(0, b - a) for a, b in zip(lo, hi, strict=True))]
            count[dst] += 1.0
    finally:
        model.train(was_training)
    return total / np.maximum(count, 1.0)


def detect_tumors(model, volume: Volume, cfg: DetectConfig = DetectConfig()) -> tuple[np.ndarray, list[Tumor]]:
    """A normalized scan on the model's grid -> (instance mask on that grid, Tumor records, largest
    first, labels empty)."""
    prob = tumor_probability(model, volume.array, window=cfg.window, overlap=cfg.overlap)
    return tumors_from_probability(prob, volume, cfg)


def tumors_from_probability(prob: np.ndarray, volume: Volume, cfg: DetectConfig) -> tuple[np.ndarray, list[Tumor]]:
    """A scan's tumor probability (tumor_probability) -> (instance mask, Tumor records, largest first):
    threshold, 26-connected components, components under the minimum volume dropped."""
    voxel_ml = abs(float(np.linalg.det(volume.affine[:3, :3]))) / 1000.0
    min_voxels = max(1, math.ceil(cfg.min_volume_ml / voxel_ml)) if voxel_ml > 0 else 1
    instances = instances_from_binary(prob > cfg.threshold, min_voxels=min_voxels)
    return instances, measure_tumors(instances, volume.affine, scan_id=volume.scan_id,
                                     where=f"{volume.scan_id} (predicted)")

