"""Tumor shapes and appearance for the synthetic cohort, in template millimetres.

A lesion is a union of ellipsoid parts (each optionally cut by a plane: a meningioma's flat dural
base), with a wobbly surface (low-order angular noise), an enhancement level, an optional
necrotic core (ring enhancement), optional oedema (darker on T1, confined to white matter) and
mass effect (brain pushed away radially). `render_lesions` draws them into a scan whose voxels
are given as template coordinates. Sampling the specs lives in phantom.py.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from scipy import ndimage


@dataclass(frozen=True, kw_only=True)
class Part:
    center: np.ndarray  # (3,) template mm
    radii: np.ndarray  # (3,) mm along the rotation's columns
    rotation: np.ndarray  # (3, 3) columns = the part's axes
    cut_normal: np.ndarray | None = None  # keep points with (q - center) . n <= cut_offset
    cut_offset: float = 0.0


@dataclass(frozen=True, kw_only=True)
class Lesion:
    kind: str  # metastasis | meningioma | schwannoma
    parts: tuple[Part, ...]
    enhancement: float  # T1c intensity relative to the template's white-matter scale (~1.2)
    heterogeneity: float  # amplitude of the texture, fraction of enhancement
    necrosis_inner: float = 0.0  # normalized radius of the necrotic core (0 = solid)
    necrosis_level: float = 0.4
    oedema_extent: float = 0.0  # oedema reaches this many radii (0 = none)
    oedema_level: float = 0.75  # white matter multiplied by this inside the oedema
    mass_effect: float = 0.0  # 0..0.8: fraction of the radius by which tissue is pushed
    wobble: tuple[tuple[float, float, float, float, float], ...] = ()  # (fx, fy, fz, phase, amp)
    texture_seed: int = 0

    @property
    def center(self) -> np.ndarray:
        return self.parts[0].center

    @property
    def radius(self) -> float:
        return float(max(p.radii.max() + np.linalg.norm(p.center - self.center) for p in self.parts))

    def scaled(self, factor: float) -> Lesion:
        """Same lesion grown (> 1) or shrunk about its first part's centre (a follow-up scan)."""
        c = self.center
        parts = tuple(
            replace(p, center=c + (p.center - c) * factor, radii=p.radii * factor,
                    cut_offset=p.cut_offset * factor)
            for p in self.parts
        )
        return replace(self, parts=parts)


def rotation_matrix(angles_rad) -> np.ndarray:
    ax, ay, az = angles_rad
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def frame_from_axis(axis: np.ndarray) -> np.ndarray:
    """A rotation whose first column is `axis` (unit)."""
    a = axis / np.linalg.norm(axis)
    helper = np.array([0.0, 0.0, 1.0]) if abs(a[2]) < 0.9 else np.array([1.0, 0.0, 0.0])
    b = np.cross(a, helper)
    b /= np.linalg.norm(b)
    return np.stack([a, b, np.cross(a, b)], axis=1)


def _part_rho(part: Part, q: np.ndarray, wobble) -> np.ndarray:
    """Normalized radius of points q (N, 3): < 1 inside the part."""
    local = (q - part.center) @ part.rotation  # (N, 3) in the part's frame
    rho = np.linalg.norm(local / part.radii, axis=1)
    if wobble:
        u = local / (np.linalg.norm(local, axis=1, keepdims=True) + 1e-6)
        noise = sum(amp * np.cos(2 * np.pi * (u @ np.array([fx, fy, fz])) + ph) for fx, fy, fz, ph, amp in wobble)
        rho = rho * (1.0 + noise)
    if part.cut_normal is not None:
        beyond = (q - part.center) @ part.cut_normal > part.cut_offset
        rho = np.where(beyond, np.inf, rho)
    return rho


def lesion_rho(lesion: Lesion, q: np.ndarray) -> np.ndarray:
    return np.min([_part_rho(p, q, lesion.wobble) for p in lesion.parts], axis=0)


def _texture(q: np.ndarray, seed: int, wavelength_mm: float = 6.0, k: int = 6) -> np.ndarray:
    """Smooth random field in [-1, 1] evaluated at points q (N, 3)."""
    r = np.random.default_rng(seed)
    omega = r.normal(size=(k, 3))
    omega *= (2 * np.pi / wavelength_mm) / np.linalg.norm(omega, axis=1, keepdims=True)
    phase = r.uniform(0, 2 * np.pi, k)
    return np.cos(q @ omega.T + phase).mean(axis=1) * np.sqrt(2.0)


def push_coordinates(q: np.ndarray, lesions, *, smooth: float = 2.0) -> np.ndarray:
    """Mass effect: where a scan voxel at template point q samples the (healthy) template.

    Tissue at radius s from a lesion's centre is seen at radius r with
    s = r - m R exp(-(r / 2R)^2), which is monotone in r: the brain is pushed outward.
    """
    out = q.copy()
    for les in lesions:
        if les.mass_effect <= 0:
            continue
        R = les.radius
        d = q - les.center
        r = np.linalg.norm(d, axis=-1, keepdims=True)
        near = (r < 5 * R)[..., 0]
        shift = les.mass_effect * R * np.exp(-((r[near] / (2 * R)) ** 2))
        out[near] -= d[near] / np.maximum(r[near], 1e-6) * shift
    return out


def render_lesions(
    image: np.ndarray,
    q: np.ndarray,
    lesions,
    *,
    white_matter,
    voxel_mm: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Draw lesions into `image` (X, Y, Z) whose voxels lie at template points q (X, Y, Z, 3).

    `white_matter(points) -> [0, 1]` tells where oedema may spread. Returns the new image and the
    instance mask (lesion i -> id i + 1; earlier lesions win where two touch).
    """
    image = image.copy()
    mask = np.zeros(image.shape, dtype=np.int16)
    edge = max(0.5 * voxel_mm, 0.5)  # soft boundary width in mm (partial volume)
    for i, les in enumerate(lesions):
        R = les.radius
        reach = R * max(1.5, 1.0 + les.oedema_extent) + 2 * voxel_mm
        d2 = np.sum((q - les.center) ** 2, axis=-1)
        idx = np.nonzero(d2 < reach**2)
        if idx[0].size == 0:
            continue
        pts = q[idx]
        rho = lesion_rho(les, pts)
        vals = image[idx]
        if les.oedema_extent > 0:
            t = np.clip((les.oedema_extent - rho) / max(les.oedema_extent - 1.0, 1e-3), 0, 1)
            wm = white_matter(pts)
            vals = vals * (1.0 - (1.0 - les.oedema_level) * wm * np.sqrt(t))
        finite = np.isfinite(rho)
        alpha = np.zeros_like(rho)
        alpha[finite] = 1.0 / (1.0 + np.exp(-np.clip((1.0 - rho[finite]) * R / edge, -30, 30)))
        tex = _texture(pts, les.texture_seed)
        level = les.enhancement * (1.0 + les.heterogeneity * tex)
        if les.necrosis_inner > 0:
            core = 1.0 / (1.0 + np.exp(-np.clip((les.necrosis_inner - rho) * R / edge, -30, 30)))
            level = level * (1 - core) + les.necrosis_level * (1.0 + 0.1 * tex) * core
        image[idx] = vals * (1 - alpha) + level * alpha
        inside = (rho <= 1.0) & (mask[idx] == 0)
        mask[tuple(a[inside] for a in idx)] = i + 1
    return image, mask


def smooth_field(shape, rng: np.random.Generator, *, control: int = 5, amplitude: float = 1.0) -> np.ndarray:
    """Smooth random field of `shape`: Gaussian control points zoomed up (cubic)."""
    coarse = rng.normal(0.0, amplitude, (control,) * 3)
    zoom = [s / control for s in shape]
    field = ndimage.zoom(coarse, zoom, order=3, mode="nearest", grid_mode=True)
    return field[: shape[0], : shape[1], : shape[2]]
