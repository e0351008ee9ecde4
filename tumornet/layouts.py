"""Loaders for the public layouts real users hold; each writes the same cohort manifest.

- BraTS 2023 MET / MEN: `<root>/BraTS-MET-00001-000/BraTS-MET-00001-000-t1c.nii.gz` and
  `...-seg.nii.gz` (labels 1 NETC, 2 SNFH, 3 ET). Patient = first 15 characters of the case
  name; scan = the case name. Tumors = 26-connected components of NETC + ET (`tumor_values`
  "1 3"); oedema is not tumor. Type from the dataset (MET -> metastasis, MEN -> meningioma).
- Vestibular-Schwannoma-SEG (NIfTI conversion): `<root>/vs_gk_<n>/vs_gk_t1_refT1.nii.gz` and
  `vs_gk_seg_refT1.nii.gz` (1 = tumor). Patient = scan = `vs_gk_<n>`; type schwannoma.
Location labels (area, halves) come from anatomy.py through the scan's registration onto the
template (register.py; onto its skull-stripped T1 for BraTS, whose images are skull-stripped, onto the
T1 with skull for VS): affine, then bent on control points `warp_mm` apart (IMPORT_WARP_MM, as the
site recipe's `retrieval.warp_mm`; 0: affine only), leaving the mask's labelled regions (oedema too)
out of its similarity: a tumor is not in the template and would pull the fit. A case that cannot be read
is recorded in `<manifest>.errors.txt` (by its rank among the sorted case folders, with the folder
name, which holds the patient id, replaced by `<case>`) and skipped; the others are kept.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .anatomy import EXTRA_AXIAL_TYPES, load_anatomy
from .boxes import box_from_mask
from .errors import InputError
from .manifest import write_manifest
from .register import check_warp_mm, register
from .tumors import instances_from_binary, tumor_mask_from_labels
from .volumes import read_label_map, read_nifti

# the registration behind the labels bends on control points this far apart (mm): on phantom scans of a
# brain unlike the template, 60 scans, its labels match the true ones more often than the affine map's
# (area 0.975 against 0.873; README: Public datasets)
IMPORT_WARP_MM = 24.0


@dataclass(frozen=True, kw_only=True)
class Layout:
    name: str
    case_pattern: str  # regex on case folder names
    image: str  # file name template, {case} = folder name
    mask: str
    tumor_type: str
    tumor_values: tuple[int, ...]
    allowed_values: tuple[int, ...]
    skull_stripped: bool
    patient_of: Callable[[str], str]


LAYOUTS = {
    "brats-met": Layout(name="brats-met", case_pattern=r"^BraTS-MET-\d{5}-\d{3}$", image="{case}-t1c.nii.gz",
                        mask="{case}-seg.nii.gz", tumor_type="metastasis", tumor_values=(1, 3),
                        allowed_values=(1, 2, 3), skull_stripped=True, patient_of=lambda c: c[:15]),
    "brats-men": Layout(name="brats-men", case_pattern=r"^BraTS-MEN-\d{5}-\d{3}$", image="{case}-t1c.nii.gz",
                        mask="{case}-seg.nii.gz", tumor_type="meningioma", tumor_values=(1, 3),
                        allowed_values=(1, 2, 3), skull_stripped=True, patient_of=lambda c: c[:15]),
    "vs-seg": Layout(name="vs-seg", case_pattern=r"^vs_gk_\d+$", image="vs_gk_t1_refT1.nii.gz",
                     mask="vs_gk_seg_refT1.nii.gz", tumor_type="schwannoma", tumor_values=(1,),
                     allowed_values=(1,), skull_stripped=False, patient_of=lambda c: c),
}


def case_rows(root: Path, case: str, layout: Layout, *, cache_dir: str | None = None,
              warp_mm: float = IMPORT_WARP_MM) -> list[dict]:
    """Manifest rows of one case (reads image + mask; raises InputError naming the file)."""
    image_rel = f"{case}/{layout.image.format(case=case)}"
    mask_rel = f"{case}/{layout.mask.format(case=case)}"
    data, affine = read_nifti(root / image_rel)
    seg, _ = read_label_map(root / mask_rel, like=(data, affine, root / image_rel))
    binary = tumor_mask_from_labels(seg, tumor_values=layout.tumor_values, allowed_values=layout.allowed_values,
                                    where=str(root / mask_rel))
    instances = instances_from_binary(binary)
    if instances.max() == 0:
        raise InputError(f"{root / mask_rel}: empty mask (no voxel with value in {list(layout.tumor_values)})")
    locations = tumor_locations(data, affine, instances, seg > 0, {}, default_type=layout.tumor_type,
                                skull_stripped=layout.skull_stripped, warp_mm=warp_mm, cache_dir=cache_dir)
    return [{"patient_id": layout.patient_of(case), "scan_id": case, "image": image_rel, "mask": mask_rel,
             "tumor_id": tid, "tumor_type": layout.tumor_type, **loc,
             "tumor_values": " ".join(str(v) for v in layout.tumor_values)} for tid, loc in locations.items()]


def tumor_locations(data: np.ndarray, affine: np.ndarray, instances: np.ndarray, labelled: np.ndarray,
                    types: dict[int, str | None], *, default_type: str | None = None, skull_stripped: bool = False,
                    warp_mm: float = IMPORT_WARP_MM, cache_dir: str | None = None) -> dict[int, dict[str, str]]:
    """The location labels of a scan's tumors (`instances` on the scan's grid: tumor ids > 0, not
    necessarily consecutive) as the import writes them: the scan registered onto the template with every
    labelled region (`labelled`, oedema too; each connected component's box) left out of the similarity,
    then anatomy.describe of each tumor's voxels in template mm, its area rule chosen by its type (`types`
    per tumor id, else `default_type`; None: by its share inside the brain) -> {tumor id: {area,
    left_right, front_rear, upper_lower}}."""
    anat = load_anatomy(cache_dir)
    parts = instances_from_binary(labelled)  # not in the template: left out of the similarity
    frame = register(data, affine, skull_stripped=skull_stripped, cache_dir=cache_dir, warp_mm=warp_mm,
                     ignore=[box_from_mask(parts == k) for k in range(1, int(parts.max()) + 1)])
    out = {}
    for tid in (int(v) for v in np.unique(instances[instances > 0])):
        kind = types.get(tid, default_type)
        out[tid] = anat.describe(frame.template_mm(np.argwhere(instances == tid)),
                                 extra_axial=EXTRA_AXIAL_TYPES[kind] if kind else None)
    return out


def import_layout(root: str | Path, layout_name: str, *, manifest_name: str = "manifest.csv",
                  cache_dir: str | None = None, warp_mm: float = IMPORT_WARP_MM, log=print) -> Path:
    """Scan `root` for cases of the layout; write `<root>/<manifest_name>` (+ .errors.txt if any).
    `warp_mm`: the registration behind the location labels (0: affine only; else >= 8 mm)."""
    warp_mm = check_warp_mm(warp_mm, "--warp-mm")
    if layout_name not in LAYOUTS:
        raise InputError(f"unknown layout {layout_name!r}; expected one of {sorted(LAYOUTS)}")
    layout = LAYOUTS[layout_name]
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{root}: not a directory")
    cases = sorted(p.name for p in root.iterdir() if p.is_dir() and re.match(layout.case_pattern, p.name))
    if not cases:
        raise InputError(f"{root}: no case folder matching the {layout.name} layout ({layout.case_pattern})")
    rows, errors = [], []
    for i, case in enumerate(cases, start=1):
        try:
            rows += case_rows(root, case, layout, cache_dir=cache_dir, warp_mm=warp_mm)
        except InputError as e:  # the errors file names cases by rank: folder names hold patient ids
            errors.append(f"case {i} of {len(cases)} (sorted folder names): "
                          + str(e).replace(str(root), "<root>").replace(case, "<case>"))
    manifest = root / manifest_name
    error_file = manifest.with_name(manifest.name + ".errors.txt")
    write_manifest(manifest, rows, tumor_values=True)
    if errors:
        error_file.write_text("\n".join(errors) + "\n")
    elif error_file.exists():
        error_file.unlink()
    log(f"{layout.name}: {len(cases) - len(errors)}/{len(cases)} cases, {len(rows)} tumors -> {manifest}"
        + (f"; {len(errors)} failed, see {error_file}" if errors else ""))
    return manifest
