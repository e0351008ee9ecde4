"""One scan -> one embedding row per tumor. Pure torch / numpy (the Ray job calls it per scan).

The scan is resampled to the model's training spacing; each tumor gets the patch the network was
trained on (centred on the tumor, the training patch size, enlarged to hold a bigger tumor whole);
the RoiPool vector over the tumor's box in that patch (the paper's embedding), the task heads'
logits on it, the box's volume and place in the head are the tumor's parts
(tumornet.descriptor), and the model's retrieval recipe composes them into the `embedding` that
search compares (for the paper's recipe: the RoiPool vector itself).
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
from collections.abc import Sequence

import numpy as np
import torch

from tumornet.boxes import voxel_to_mm
from tumornet.descriptor import (
    compose,
    predicted_classes,
    recipe_of,
    refine_box,
    stack_parts,
    tumors_parts,
)
from tumornet.detect import DetectConfig, detect_tumors
from tumornet.drawn import drawn_fit_of, with_drawn_size
from tumornet.errors import InputError
from tumornet.export import load_model
from tumornet.handcrafted import handcrafted_features
from tumornet.keys import keyed_id, patient_key
from tumornet.manifest import ManifestRow
from tumornet.network import MultitaskNet
from tumornet.recipe import SEARCH_ONLY, RetrievalConfig
from tumornet.register import FIT_SETTINGS, IGNORE_MARGIN_MM, WARP_SETTINGS, register
from tumornet.scans import Scan, load_image, load_scan
from tumornet.tumors import tumor_extent
from tumornet.volumes import Volume, head_box_voxels


def source_hash(rows: Sequence[ManifestRow], settings: str = "") -> str:
    """sha256 over the scan's image and mask file contents, then the embedding settings (the job's
    settings_fingerprint): what decides a re-embedding. A changed file or a changed recipe, spacing,
    patch size or detection setting with the same weights (model id) embeds the scan again."""
    h = hashlib.sha256()
    for path in (rows[0].image, rows[0].mask):
        if path is None:  # no mask: the tumors are found by the model
            continue
        if not path.is_file():
            raise InputError(f"{path}: file not found", kind="missing_file")
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    h.update(settings.encode())
    return h.hexdigest()


# recipe keys added after archives existed -> their default
RECIPE_ADDED = {"size_units": "log", "task_temperature": 1.0, "size_source": "box", "head_draws": 0,
                "head_select": "fixed", "warp_mm": 0.0, "frame_skips_tumors": False, "scan_count": False,
                "count_weight": 1.0, "mirror": False}


# statistics that only a search reads (the drawn-box size regression, retrieval.drawn_read: fit): a model
# file that gains them keeps its archives
SEARCH_STATS = ("drawn_fit",)


# how a mask's box is measured (tumornet.tumors.tumor_extent; nineteenth round: its own extent, no longer
# the working grid's voxels that cover it): a change embeds every archive again
BOX_EXTENT = {"box_extent": "mask"}


def settings_fingerprint(spacing, patch: int, recipe, detect: DetectConfig, detector_id: str | None = None) -> str:
    """What besides the weights and the files decides a shard row: spacing, patch size, the retrieval
    recipe and its statistics, the detection settings, the detector model's id where one finds the
    tumors of scans without a mask (none: the model's own segmentation head, as archives embedded before
    the detector existed), and the registration's settings when the recipe reads the template frame
    (16 hex chars)."""
    # recipe keys added later are left out at their default, so the archives embedded before stay valid
    same = {k: v for k, v in dataclasses.asdict(recipe[0]).items()
            if RECIPE_ADDED.get(k, ...) != v and k not in SEARCH_ONLY}
    stats = {k: v for k, v in (recipe[1] or {}).items() if k not in SEARCH_STATS} if recipe[1] is not None else None
    parts = [spacing, patch, same, stats, dataclasses.asdict(detect), BOX_EXTENT]
    if detector_id is not None:
        parts.append({"detector": detector_id})
    if recipe[0].needs_frame:
        parts.append(FIT_SETTINGS)
        if recipe[0].warp_mm > 0:
            parts.append(WARP_SETTINGS)
        if recipe[0].frame_skips_tumors:
            parts.append({"ignore_margin_mm": IGNORE_MARGIN_MM})
    text = json.dumps(parts, sort_keys=True, default=float)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def embed_settings(meta: dict, model_path, *, spacing_mm=None, patch_size: int | None = None):
    """(spacing, patch size, retrieval recipe) to embed with: the given spacing and patch size, else
    those the model was trained with, and the model's recipe (all recorded in the model file)."""
    extra = meta["extra"]
    spacing = spacing_mm or extra.get("spacing_mm")
    if spacing is None:
        raise InputError(f"{model_path}: the model records no training spacing; pass --spacing")
    return spacing, int(patch_size or extra.get("patch_size") or 64), recipe_of(meta)


def model_fingerprint(model_path) -> str:
    """The settings fingerprint a model file's own settings give an archive's rows (settings_fingerprint:
    its spacing, patch size, recipe and statistics, detection settings; no detector)."""
    _, meta = load_model(model_path)
    spacing, patch, recipe = embed_settings(meta, model_path)
    return settings_fingerprint(spacing, patch, recipe, detect_settings(meta))


def detect_settings(meta: dict, **overrides) -> DetectConfig:
    """How tumors are found in scans without a mask: the model's config section `detect` (recorded
    at training), with overrides (e.g. min_volume_ml) where not None."""
    base = dict(meta.get("extra", {}).get("config", {}).get("detect") or {})
    return DetectConfig(**(base | {k: v for k, v in overrides.items() if v is not None}))


def load_detector(path, meta: dict, spacing_mm, *, min_volume_ml: float | None = None):
    """What finds the tumors of scans without a mask for the model of `meta` -> (network, its metadata,
    detect settings): with a detector `path`, that model file's segmentation head at its own `detect`
    settings (e.g. one trained with loss.seg_tumor_weight > 1; the retrieval model still embeds the tumors),
    which must work on the retrieval model's grid (`spacing_mm`: detection runs on the scan read for
    embedding); without one (None or ""), (None, None, the model's own settings). min_volume_ml overrides."""
    if not path:
        return None, None, detect_settings(meta, min_volume_ml=min_volume_ml)
    model, own_meta = load_model(path)
    own = own_meta["extra"].get("spacing_mm")
    if own is None or not np.allclose(np.broadcast_to(np.asarray(own, float), 3),
                                      np.broadcast_to(np.asarray(spacing_mm, float), 3)):
        raise InputError(f"{path}: the detector was trained at {own} mm, the retrieval model works at {spacing_mm} "
                         "mm; a detector must share the retrieval model's spacing")
    return model, own_meta, detect_settings(own_meta, min_volume_ml=min_volume_ml)


def read_scan(rows: Sequence[ManifestRow], *, spacing_mm) -> Scan | Volume:
    """The CPU part of embedding a scan (decode, resample, normalize; the mask's tumors measured):
    a Scan, or for a scan without a mask its Volume alone (its tumors are found by the network)."""
    if rows[0].mask is None:
        return load_image(rows[0].image, rows[0].scan_id, spacing_mm=spacing_mm)
    return load_scan(rows, spacing_mm=spacing_mm)


def embed_scan(model: MultitaskNet, model_id: str, rows: Sequence[ManifestRow], *, spacing_mm, patch_size: int,
               secret: bytes, file_hash: str | None = None, box_fn=None, recipe=None,
               detect: DetectConfig | None = None, detector=None) -> list[dict]:
    """Rows (one scan_id) of a manifest -> shard rows (see embedder.shards.shard_schema): read_scan
    then embed_read."""
    return embed_read(model, model_id, rows, read_scan(rows, spacing_mm=spacing_mm), spacing_mm=spacing_mm,
                      patch_size=patch_size, secret=secret, file_hash=file_hash, box_fn=box_fn, recipe=recipe,
                      detect=detect, detector=detector)


@torch.no_grad()
def embed_read(model: MultitaskNet, model_id: str, rows: Sequence[ManifestRow], read: Scan | Volume, *, spacing_mm,
               patch_size: int, secret: bytes, file_hash: str | None = None, box_fn=None, recipe=None,
               detect: DetectConfig | None = None, detector=None) -> list[dict]:
    """The network's part of embedding a scan read by read_scan -> shard rows.

    recipe: (RetrievalConfig, statistics) of the model file (tumornet.descriptor.recipe_of); None:
    the paper's raw RoiPool vector. box_fn (optional): box -> box, applied to each tumor's box
    before its patch is cut and pooled (the robustness evaluation passes the paper's box
    distortion), then refined as a search by box does when the recipe says so (retrieval.refine_box),
    or their size read as a search by box reads a drawn box's (retrieval.drawn_size); rows then carry
    the box used. A scan without a mask (a Volume) gets its tumors from
    the segmentation head (tumornet.detect, settings `detect`; `detector`: another network's, see
    load_detector): rows with source = predicted,
    labels -1, their scan's tumor count not read by the recipe (scan_log_tumors NaN). The tumors'
    patches go through the network together (tumornet.descriptor.tumors_parts)."""
    cfg, stats = recipe or (RetrievalConfig(), None)
    predicted = isinstance(read, Volume)
    if predicted:
        instances, tumors = detect_tumors(model if detector is None else detector, read, detect or DetectConfig())
        scan = Scan(volume=read, instances=instances, tumors=tuple(tumors))
    else:
        scan = read
    image = scan.volume.array
    head = head_box_voxels(image)
    centre_mm = voxel_to_mm(head[0], scan.volume.affine)
    tasks = list(model.schema.names)
    now = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    common = {"scan_key": keyed_id(rows[0].scan_id, secret), "patient_key": patient_key(rows[0].patient_id, secret),
              "model_id": model_id, "source_hash": source_hash(rows) if file_hash is None else file_hash,
              "embedded_at": now}
    boxes = [t.bbox if box_fn is None else np.asarray(box_fn(t.bbox), dtype=np.int64) for t in scan.tumors]
    if box_fn is not None and cfg.refine_box:  # drawn boxes, as a search by box refines them
        boxes = [refine_box(model, image, b, patch_size=patch_size, head=head) for b in boxes]
    # a recipe that reads the box's place gets both places stored (another frame can be scored later)
    frame = (register(image, scan.volume.affine, warp_mm=cfg.warp_mm, ignore=boxes if cfg.frame_skips_tumors else None)
             if cfg.uses_position else None)
    # a mask's box is read at its own extent, not the working grid's voxels that cover it (nineteenth round)
    extents = None if box_fn is not None else [tumor_extent(t, scan.volume.affine, image.shape) for t in scan.tumors]
    # the count of tumors found without a mask is not read (the segmentation head's count is not trusted:
    # nineteenth round); the shards keep it in `scan_tumors`, with `source` saying where it came from
    all_parts = tumors_parts(model, image, boxes, patch_size=patch_size, spacing_mm=spacing_mm, head=head,
                             frame=frame, scan_tumors=len(boxes), count_known=not predicted, extents=extents,
                             mirror=cfg.mirror)
    if box_fn is not None and cfg.drawn_size and not cfg.refine_box:  # drawn boxes' size, as a search by box reads it
        fit = drawn_fit_of(cfg, stats, "the model file")
        all_parts = [with_drawn_size(p, cfg.drawn_size, spacing_mm, fit) for p in all_parts]
    classes = predicted_classes(stack_parts(all_parts), cfg, model.schema, stats) if all_parts else {}
    # each tumor's case information (the manifest's info_* cells; a scan without a mask: its one row's)
    info = {r.tumor_id: r.info for r in rows}
    out = []
    for i, (t, bbox, parts) in enumerate(zip(scan.tumors, boxes, all_parts, strict=True)):
        vector = compose({k: np.asarray(v)[None] for k, v in parts.items()}, cfg, model.schema, stats)[0]
        row = dict(common, tumor_id=t.tumor_id, source="predicted" if predicted else "mask",
                   bbox=bbox.astype(int).tolist(),
                   bbox_mm=t.bbox_mm.astype(float).tolist(), centroid_mm=t.centroid_mm.astype(float).tolist(),
                   volume_ml=float(t.volume_ml), size_mm=float(t.size_mm), embedding=vector.tolist(),
                   roipool=parts["roipool"].tolist(), task_logits=parts["task_logits"].tolist(),
                   box_log_volume=parts["box_log_volume"], position=parts["position"].tolist(),
                   template_position=parts["template_position"].tolist() if frame is not None else None,
                   atlas=parts["atlas"].tolist() if frame is not None else None,
                   seg_log_volume=parts["seg_log_volume"], scan_tumors=len(boxes), roimean=parts["roimean"].tolist(),
                   context=parts["context"].tolist(),
                   handcrafted=handcrafted_features(image, scan.instances, t, centre_mm).tolist())
        for k in tasks:
            row[f"label_{k}"] = int(t.labels.get(k, -1))
            row[f"pred_{k}"] = int(classes[k][i])
        row.update(rows[0].info if predicted else info.get(t.tumor_id, {}))
        out.append(row)
    return out
