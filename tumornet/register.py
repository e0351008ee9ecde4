"""Affine registration of a scan onto the template (ICBM152 2009c T1 with skull, anatomy.py).

What a tumor's place in the head means depends on the head: its size, shape, tilt and the field of
view. The head's foreground box (volumes.head_box_voxels) removes size and position per axis, not a
tilt nor a head shape unlike the template's. `register` fits a full affine map from template mm to
the scan's world mm by normalized cross-correlation of intensities (torch, coarse to fine: 8 mm then
4 mm), starting from the foreground-box alignment, so that `TemplateFrame.position` gives every point
of the scan in template coordinates, whatever the scan's orientation, spacing or tilt.

An affine map cannot undo a brain whose parts sit otherwise than the template's (another population,
another patient's anatomy): `register(..., warp_mm=S)` then fits, after the affine, a smooth
displacement of template space on a lattice of control points S mm apart (trilinear between them,
a membrane penalty on its gradient), so that the atlas reads the patient's own anatomy.

A tumor is not in the template: its bright voxels, and the tissue it pushes aside, pull the fit
towards the template's brightest structures, most where the tumor is. `register(..., ignore=boxes)`
leaves the given voxel boxes (the tumors', or a box drawn around one), grown by IGNORE_MARGIN_MM,
out of the similarity: cost-function masking, so that the fit follows the brain around the tumor.

Positions are scaled so that the template brain spans [-1, 1] per axis (RAS) around the reference
the location labels use (Anatomy.center_mm; left / right at x = 0): the same scale as the head-box
position, in a frame shared by every scan.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from .anatomy import foreground_box_mm, load_anatomy
from .boxes import ellipsoid_voxels, voxel_to_mm
from .errors import InputError

LEVELS_MM = (8.0, 4.0)  # the coarse-to-fine grids the similarity is computed on
STEPS = (120, 60)  # optimizer steps per level
# template points kept per level: every voxel whose index sum is a multiple of k, an even lattice (the
# similarity's gradient needs thousands of points, not every voxel; 12,700 and 86,300 -> 6,400 and 21,600)
POINT_EVERY = (2, 4)
# what decides a fit besides the scan: part of the embedding settings (embedder.embed.settings_fingerprint),
# so an archive embedded with another fit is embedded again
FIT_SETTINGS = {"levels_mm": LEVELS_MM, "steps": STEPS, "point_every": POINT_EVERY}
# the deformable stage (warp_mm > 0): optimizer steps per level, its step (mm), the membrane penalty's
# weight (the mean squared gradient of the displacement, unitless, against the similarity's ~1) and the
# fixed-point iterations that invert it; part of the embedding settings where a recipe warps
WARP_STEPS = (40, 60)
WARP_LR_MM = 0.3
WARP_SMOOTH = 0.1
WARP_INVERSE_ITERATIONS = 12
WARP_SETTINGS = {"steps": WARP_STEPS, "lr_mm": WARP_LR_MM, "smooth": WARP_SMOOTH,
                 "inverse_iterations": WARP_INVERSE_ITERATIONS}
MIN_WARP_MM = 8.0  # the finest control-point spacing warp_mm may ask for (0: affine only)


def check_warp_mm(value, where: str) -> float:
    """A control-point spacing as configured (`where`: the key or option that gave it) -> float; 0
    (affine only) or >= MIN_WARP_MM, else an InputError naming `where`."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not (value == 0 or value >= MIN_WARP_MM):
        raise InputError(f"{where}: expected 0 (affine registration only) or a control-point spacing >= "
                         f"{MIN_WARP_MM:g} mm, got {value!r}")
    return float(value)


# boxes left out of the similarity (register's `ignore`) are grown by this much on every side (mm): the
# tissue a tumor pushes aside; part of the embedding settings where a recipe masks the tumors
IGNORE_MARGIN_MM = 4.0


@dataclass(frozen=True)
class TemplateFrame:
    """A scan's voxel -> template mm map (4 x 4) and the template brain's centre / half extent (mm)."""

    voxel_to_template: np.ndarray
    centre_mm: np.ndarray
    half_mm: np.ndarray
    cache_dir: str | None = None  # where the template anatomy is cached (anatomy.load_anatomy)
    # the deformable stage (register's warp_mm): the displacement u (3, n0, n1, n2) in template mm on a
    # lattice spanning warp_lo_mm..warp_hi_mm; the scan shows template point t where the affine map
    # puts t + u(t). None: affine only
    warp: np.ndarray | None = None
    warp_lo_mm: np.ndarray | None = None
    warp_hi_mm: np.ndarray | None = None

    def template_mm(self, voxels) -> np.ndarray:
        y = voxel_to_mm(np.asarray(voxels, dtype=np.float64), self.voxel_to_template)
        if self.warp is None:
            return y
        # t + u(t) = y, solved by the fixed point t <- y - u(t) (u smooth: its gradient well under 1)
        t = y
        for _ in range(WARP_INVERSE_ITERATIONS):
            t = y - self.displacement(t)
        return t

    def displacement(self, template_mm) -> np.ndarray:
        """The fitted displacement u at template points (..., 3), mm (trilinear; constant outside)."""
        pts = np.asarray(template_mm, dtype=np.float64)
        n = np.asarray(self.warp.shape[1:])
        idx = (pts - self.warp_lo_mm) / (self.warp_hi_mm - self.warp_lo_mm) * (n - 1)
        coords = np.moveaxis(idx.reshape(-1, 3), -1, 0)
        u = [ndimage.map_coordinates(self.warp[k], coords, order=1, mode="nearest") for k in range(3)]
        return np.stack(u, -1).reshape(pts.shape)

    def position(self, voxels) -> np.ndarray:
        """Scan voxel coordinates (..., 3) -> template position, the template brain = [-1, 1] (RAS)."""
        return ((self.template_mm(voxels) - self.centre_mm) / self.half_mm).astype(np.float32)

    def atlas(self, box) -> np.ndarray:
        """What the atlas says of a scan's voxel box (anatomy.ATLAS_FEATURES): the ellipsoid inscribed
        in the box, carried into template space, read by the rules the location labels come from."""
        return load_anatomy(self.cache_dir).atlas_features(self.template_mm(ellipsoid_voxels(box)))


def _grid_image(array: np.ndarray, affine: np.ndarray, step_mm: float) -> tuple[torch.Tensor, np.ndarray]:
    """Smooth and subsample a RAS array to about `step_mm` voxels -> (tensor (1, 1, D, H, W), its affine)."""
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(0))
    k = np.maximum(np.rint(step_mm / spacing), 1).astype(int)
    sm = ndimage.gaussian_filter(array.astype(np.float32), sigma=np.maximum(k - 1, 0) / 2.0)
    sub = np.ascontiguousarray(sm[::k[0], ::k[1], ::k[2]])
    aff = affine.copy()
    aff[:3, :3] = affine[:3, :3] * k
    return torch.from_numpy(sub)[None, None], aff


def _t(a) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a, dtype=np.float32))


def _zscore_foreground(array: np.ndarray) -> np.ndarray:
    fg = ndimage.binary_fill_holes(array > array.mean())
    v = array[fg]
    return ((array - v.mean()) / (v.std() + 1e-6)).astype(np.float32)


def _box_mm(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    box = foreground_box_mm(array, affine)
    return box[:3], box[3:]


@lru_cache(maxsize=4)
def _template(cache_dir: str | None, skull_stripped: bool = False):
    anat = load_anatomy(cache_dir)
    ref = anat.t1_brain if skull_stripped else anat.t1
    t1 = _zscore_foreground(ref)
    levels = []
    for step, every in zip(LEVELS_MM, POINT_EVERY, strict=True):
        img, aff = _grid_image(t1, anat.affine, step)
        mask = ndimage.binary_dilation(img[0, 0].numpy() > img.min().item() + 0.5, iterations=2)  # head + rim
        mask &= np.indices(mask.shape).sum(0) % every == 0
        mask = torch.from_numpy(mask)
        idx = torch.nonzero(mask).float()
        pts = idx @ _t(aff[:3, :3]).T + _t(aff[:3, 3])  # template mm (n, 3)
        levels.append((pts, img[0, 0][mask].float()))
    coords = np.argwhere(anat.brain)
    lo, hi = voxel_to_mm(coords.min(0), anat.affine), voxel_to_mm(coords.max(0), anat.affine)
    box = _box_mm(ref, anat.affine)
    return levels, box, np.asarray(anat.center_mm, float), (hi - lo) / 2.0


def _ncc_centred(a: torch.Tensor, b: torch.Tensor, b_ss: torch.Tensor) -> torch.Tensor:
    """Normalized cross-correlation of `a` with `b`, which is already centred (sum of squares `b_ss`):
    a's mean drops out of the product, since b sums to zero."""
    a_ss = (a * a).sum() - a.sum() ** 2 / a.numel()
    return (a * b).sum() / torch.sqrt(a_ss * b_ss + 1e-12)


class _Adam:
    """Adam on a few tensors (torch.optim imports torch's compiler stack: seconds in every new process)."""

    def __init__(self, params_lr, betas=(0.9, 0.999), eps=1e-8):
        self.params_lr, self.betas, self.eps, self.t = params_lr, betas, eps, 0
        self.m = [torch.zeros_like(p) for p, _ in params_lr]
        self.v = [torch.zeros_like(p) for p, _ in params_lr]

    @torch.no_grad()
    def step(self, grads) -> None:
        self.t += 1
        b1, b2 = self.betas
        for (p, lr), g, m, v in zip(self.params_lr, grads, self.m, self.v, strict=True):
            m.mul_(b1).add_(g, alpha=1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            p -= lr * (m / (1 - b1**self.t)) / (torch.sqrt(v / (1 - b2**self.t)) + self.eps)


_FITTED: OrderedDict[bytes, TemplateFrame] = OrderedDict()  # the last scans' frames (a scan embedded again)
FITTED_KEPT = 64


def register(image: np.ndarray, affine: np.ndarray, *, cache_dir: str | None = None,
             skull_stripped: bool = False, warp_mm: float = 0.0, ignore=None) -> TemplateFrame:
    """Fit the affine map of a canonical-RAS scan (array, voxel -> world mm affine) onto the template
    (its skull-stripped T1 for a skull-stripped scan, e.g. BraTS), then where `warp_mm` > 0 a smooth
    displacement on control points that far apart. `ignore`: voxel boxes (x0, y0, z0, x1, y1, z1, ends
    excluded) left out of the similarity, each grown by IGNORE_MARGIN_MM (None or empty: none). The same
    scan again (the same array, affine, boxes and settings) reuses its fit."""
    boxes = np.zeros((0, 6), np.int64) if ignore is None else np.asarray(ignore, np.int64).reshape(-1, 6)
    h = hashlib.sha256(np.ascontiguousarray(image).view(np.uint8).data)
    for part in (str(image.shape), str(image.dtype), np.asarray(affine, np.float64).tobytes(),
                 repr((cache_dir, skull_stripped, float(warp_mm))), np.sort(boxes, axis=0).tobytes()):
        h.update(part if isinstance(part, bytes) else part.encode())
    key = h.digest()
    if key in _FITTED:
        _FITTED.move_to_end(key)
        return _FITTED[key]
    frame = _register(image, affine, cache_dir=cache_dir, skull_stripped=skull_stripped, warp_mm=float(warp_mm),
                      keep=_kept_voxels(image.shape, affine, boxes) if len(boxes) else None)
    _FITTED[key] = frame
    while len(_FITTED) > FITTED_KEPT:
        _FITTED.popitem(last=False)
    return frame


def _kept_voxels(shape, affine: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """1 where the similarity reads the scan, 0 in the boxes grown by IGNORE_MARGIN_MM (float32, `shape`)."""
    keep = np.ones(shape, np.float32)
    grow = np.ceil(IGNORE_MARGIN_MM / np.sqrt((affine[:3, :3] ** 2).sum(0))).astype(np.int64)
    for box in boxes:
        lo, hi = np.maximum(box[:3] - grow, 0), np.minimum(box[3:] + grow, shape)
        keep[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = 0.0
    return keep


def _similarity(img: torch.Tensor, grid: torch.Tensor, centred: torch.Tensor, target_ss: torch.Tensor,
                keep: torch.Tensor | None) -> torch.Tensor:
    """NCC of the scan sampled at `grid` with the template points' centred intensities; with `keep`
    (a grid image of _kept_voxels) over the points that fall where it is 1 only."""
    a = _sample_at(img, grid)
    if keep is None:
        return _ncc_centred(a, centred, target_ss)
    kept = _sample_at(keep, grid.detach()) > 0.5
    b = centred[kept] - centred[kept].mean()
    return _ncc_centred(a[kept], b, (b * b).sum())


def _to_grid(img: torch.Tensor, aff: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Scan mm -> grid_sample's [-1, 1] of a grid image (x=W, y=H, z=D): (3 x 3 map, shift)."""
    inv = _t(np.linalg.inv(aff))
    scale = 2.0 / (torch.tensor(img.shape[2:], dtype=torch.float32) - 1)
    return (scale[:, None] * inv[:3, :3]).flip(0), (scale * inv[:3, 3] - 1).flip(0)


def _sample_at(img: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    return F.grid_sample(img, grid.view(1, 1, 1, -1, 3), align_corners=True, padding_mode="zeros").view(-1)


def _register(image: np.ndarray, affine: np.ndarray, *, cache_dir: str | None, skull_stripped: bool,
              warp_mm: float = 0.0, keep: np.ndarray | None = None) -> TemplateFrame:
    levels, (tlo, thi), centre, half = _template(cache_dir, skull_stripped)
    slo, shi = _box_mm(image, affine)
    # start: the foreground boxes aligned per axis (template mm -> scan mm: x_s = a0 x_t + b0)
    a0 = np.diag((shi - slo) / np.maximum(thi - tlo, 1e-6))
    b0 = (slo + shi) / 2.0 - a0 @ ((tlo + thi) / 2.0)
    lin = torch.zeros(3, 3, dtype=torch.float32, requires_grad=True)  # x_s = a0 (I + lin) (x_t - c) + ...
    shift = torch.zeros(3, dtype=torch.float32, requires_grad=True)  # mm
    a0_t, b0_t, tc = _t(a0), _t(b0), _t((tlo + thi) / 2.0)
    norm = _zscore_foreground(np.asarray(image, dtype=np.float32))
    eye = torch.eye(3, dtype=torch.float32)
    grids = [_grid_image(norm, affine, step_mm) for step_mm in LEVELS_MM]
    keeps = [None if keep is None else _grid_image(keep, affine, step_mm)[0] for step_mm in LEVELS_MM]
    with torch.enable_grad():
        for (img, aff), kept, steps, (pts, target) in zip(grids, keeps, STEPS, levels, strict=True):
            img = img.float()
            # template mm -> scan mm -> scan voxel -> grid_sample's [-1, 1]: one 3 x 4 map
            to_grid, grid_shift = _to_grid(img, aff)
            centred = target - target.mean()
            target_ss = (centred * centred).sum()
            adam = _Adam(((lin, 0.01), (shift, 1.0)))
            for _ in range(steps):
                a = a0_t @ (eye + lin)
                m = to_grid @ a
                c = to_grid @ (a0_t @ tc + b0_t + shift - a @ tc) + grid_shift
                loss = -_similarity(img, torch.addmm(c, pts, m.T), centred, target_ss, kept)
                adam.step(torch.autograd.grad(loss, [lin, shift]))
    with torch.no_grad():
        a = (a0_t @ (torch.eye(3, dtype=torch.float32) + lin)).numpy()
        b = (a0_t @ tc + b0_t + shift).numpy() - a @ tc.numpy()
    warp = _fit_warp(grids, keeps, levels, a, b, tlo, thi, warp_mm) if warp_mm > 0 else None
    # scan voxel -> scan mm -> template mm: x_t = a^-1 (x_s - b)
    a_inv = np.linalg.inv(a)
    to_template = np.eye(4)
    to_template[:3, :3] = a_inv
    to_template[:3, 3] = -a_inv @ b
    return TemplateFrame(voxel_to_template=to_template @ affine, centre_mm=centre, half_mm=half, cache_dir=cache_dir,
                         warp=warp, warp_lo_mm=None if warp is None else np.asarray(tlo, float),
                         warp_hi_mm=None if warp is None else np.asarray(thi, float))


def _fit_warp(grids, keeps, levels, a: np.ndarray, b: np.ndarray, tlo, thi, warp_mm: float) -> np.ndarray:
    """The deformable stage: with the affine map fixed (x_s = a (t + u(t)) + b), fit the displacement u
    on control points about `warp_mm` apart over the template's head box (trilinear in between) by the
    same similarity, plus WARP_SMOOTH x the mean squared gradient of u -> u (3, n0, n1, n2), mm."""
    lo, hi = _t(tlo), _t(thi)
    n = np.maximum(np.ceil((np.asarray(thi) - np.asarray(tlo)) / warp_mm).astype(int) + 1, 2)
    spacing = _t((np.asarray(thi) - np.asarray(tlo)) / (n - 1))
    u = torch.zeros(1, 3, *n, dtype=torch.float32, requires_grad=True)
    a_t, b_t = _t(a), _t(b)
    with torch.enable_grad():
        for (img, aff), kept, steps, (pts, target) in zip(grids, keeps, WARP_STEPS, levels, strict=True):
            img = img.float()
            to_grid, grid_shift = _to_grid(img, aff)
            m, c = to_grid @ a_t, to_grid @ b_t + grid_shift
            where = ((2 * (pts - lo) / (hi - lo) - 1).flip(-1)).view(1, 1, 1, -1, 3)  # pts on u's lattice
            centred = target - target.mean()
            target_ss = (centred * centred).sum()
            adam = _Adam(((u, WARP_LR_MM),))
            for _ in range(steps):
                disp = F.grid_sample(u, where, align_corners=True, padding_mode="border").view(3, -1).T
                grid = torch.addmm(c, pts + disp, m.T)
                loss = -_similarity(img, grid, centred, target_ss, kept)
                grads = [torch.diff(u, dim=d + 2) / spacing[d] for d in range(3)]
                loss = loss + WARP_SMOOTH * sum((g * g).mean() for g in grads)
                adam.step(torch.autograd.grad(loss, [u]))
    return u.detach()[0].numpy().astype(np.float64)
