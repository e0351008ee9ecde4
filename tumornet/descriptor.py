"""The retrieval vector of a tumor: what `embed` stores as `embedding` and `search` compares.

The network gives, for a tumor box in a scan (the training patch cut around it):
- `roipool`: the RoiPool vector (C numbers), the paper's embedding;
- `task_logits`: the task heads' logits on that vector (all tasks' classes, concatenated);
- `roimean`: the mean of the feature map over the box (C numbers; the paper pools the max);
- `context`: the mean of the feature map over a shell around the box (the box grown by half its size
  on every side, minus the box: the tissue around the tumor, C numbers);
and the box itself gives:
- `box_log_volume`: log of the box volume in ml (what a drawn box says of the tumor's size);
- `seg_log_volume`: log of the volume in ml that the segmentation head calls tumor in the connected
  components the box touches (whole components, also outside the box): the tumor's size as the
  network sees it, which a rough box changes little;
- `position`: the box centre relative to the head's foreground box, scaled so that the head spans
  [-1, 1] per axis (RAS): the tumor's place in the head whatever the scan's orientation, spacing,
  field of view or head size;
- `template_position`: the box centre in template space, through the scan's affine registration onto
  the ICBM152 template (tumornet.register), scaled so that the template brain spans [-1, 1] per axis:
  the same place corrected for the head's tilt and shape (given when the scan's TemplateFrame is);
- `atlas`: what the atlas says of the box carried into template space (anatomy.ATLAS_FEATURES): each
  area's share of the ellipsoid inscribed in the box, the extra-axial rule's skull base, the share
  inside the brain: the rules the location labels are made by (given with the TemplateFrame);
- `scan_log_tumors`: the log of how many tumors the box's scan holds (the caller's count: the mask's, or
  a drawn box's given count; NaN where it is not known: a drawn box without one, or tumors found without
  a mask), read by the refit heads with `scan_count` (several tumors in one scan: metastases far more
  often than not; where it is NaN, heads fit without it).
None of these needs a mask: a box is enough (the paper's query). `position_frame` says which of the
two positions the recipe's `position` part and the refit heads read ("atlas": the template's, and the
refit heads also read `atlas`).

The `tasks` part is each task's class probabilities: from the network's own heads (a linear layer on
the RoiPool vector, which must guess where the box is from its content), or, with `heads: refit`, from
heads refit at export on the training tumors' RoiPool vector, position and box size
(`tumornet.fitted.fit_heads`: one multinomial logistic regression per task, stored in the model file),
which know where it is; with `head_select: cv` each head reads only the inputs, and with the L2
strength, that cross-validation over the training patients chose (a side of the midline from the
place alone).

`compose` turns these parts into one vector with the weights of `RetrievalConfig` (tumornet.recipe;
config section `retrieval`). Every part is scaled so that two random training tumors differ by about 1 in
squared distance per part (the RoiPool dims, the log volume and the position z-scored with the
training tumors' statistics, `tumornet.fitted.fit_stats`, stored in the model file; each task's class
probabilities / sqrt(2)), so a weight says how much that part counts. The paper's embedding is
`roipool: 1` with `standardize: false`: the raw RoiPool vector, unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from .boxes import box_center, box_from_mask, box_size, shift_box
from .drawn import box_log_volume, span_of, span_profile
from .errors import InputError
from .fitted import (
    _softmax,
    _z,
    refit_probabilities,
    size_key,
    with_diameters,
    with_fitted_size,
)
from .labels import LabelSchema
from .network import roi_mean_pool, roi_pool, shell_mean_pool
from .patches import centred_patch, patch_origin, patch_size_for
from .recipe import RetrievalConfig
from .volumes import head_box_voxels


def segmented_voxels(foreground: np.ndarray, box, extent=None) -> int:
    """Voxels of the connected components (26-neighbourhood) of a binary segmentation that the box
    (lo0, lo1, lo2, hi0, hi1, hi2) touches, whole; none touched: the box's inscribed ellipsoid (of
    `extent` voxels per axis when given: a drawn box's own size, see tumors_parts)."""
    from scipy import ndimage

    lo, hi = np.asarray(box[:3], int), np.asarray(box[3:], int)
    inside = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    if not foreground[inside].any():
        return max(round(np.pi / 6 * float(np.prod(hi - lo if extent is None else extent))), 1)
    labels, _ = ndimage.label(foreground, structure=np.ones((3, 3, 3), bool))
    touched = np.unique(labels[inside])
    return int(np.isin(labels, touched[touched > 0]).sum())


@torch.no_grad()
def refine_box(model, image: np.ndarray, bbox, *, patch_size: int, head=None, core: float = 0.5,
               min_share: float = 0.05) -> np.ndarray:
    """A box drawn around a tumor (voxels of `image`, the model's working grid) -> the box of what the
    segmentation head calls tumor there: the whole connected components (26-neighbourhood) of its
    foreground, in the patch centred on the box, that reach the box's core (the box shrunk to `core`
    of its size about its centre; a neighbouring tumor the box only grazes is left out). The drawn box
    is kept where those cover less than `min_share` of it (nothing found, or a speck)."""
    from scipy import ndimage

    bbox = np.asarray(bbox, dtype=np.int64)
    size = patch_size_for(bbox, patch_size)
    origin = patch_origin(bbox, image.shape, size, None)
    img, pbox, frame = centred_patch(image, bbox, size, head)
    was_training = model.training
    model.eval()
    try:
        f = model.features(torch.from_numpy(img[None]).to(model.device), torch.from_numpy(frame[None]))
        foreground = (model.seg_head(f).argmax(1)[0] > 0).cpu().numpy()
    finally:
        model.train(was_training)
    centre, half = box_center(pbox), np.maximum(box_size(pbox) * core / 2, 0.5)
    lo = np.clip(np.floor(centre - half).astype(int), 0, size - 1)
    hi = np.clip(np.ceil(centre + half).astype(int), lo + 1, size)
    labels, _ = ndimage.label(foreground, structure=np.ones((3, 3, 3), bool))
    touched = np.unique(labels[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]])
    found = np.isin(labels, touched[touched > 0])
    if found.sum() < min_share * float(np.prod(box_size(pbox))):
        return bbox
    return shift_box(box_from_mask(found), origin).astype(np.int64)


@torch.no_grad()
def tumors_parts(model, image: np.ndarray, bboxes, *, patch_size: int, spacing_mm, head=None, frame=None,
                 batch: int = 8, extents=None, scan_tumors: int | None = None,
                 count_known: bool = True, mirror: bool = False) -> list[dict]:
    """The parts of tumor boxes of one scan (voxels of `image`, the model's working grid) -> one dict
    per box: {"roipool" (C,), "task_logits" (sum of classes,), "roimean" (C,), "context" (C,),
    "box_log_volume", "position" (3,), "seg_log_volume", "extent" (3,): the extent the box's size was read
    from, "tumor_span" (3,): tumor_span's, "span_profile" (3, tumornet.drawn.PROFILE_WIDTH): span_profile's, for
    with_drawn_size}. Each box gets the training patch centred on
    it (larger for a larger tumor); patches of one size go through the network together, up to
    `batch` at a time (eval mode: the numbers of one at a time, to float rounding). With the scan's TemplateFrame
    (`frame`, tumornet.register) each dict also has "template_position" (3,) and "atlas"
    (anatomy.ATLAS_FEATURES). `extents` (one per box, voxels per axis, continuous; None: the boxes' own):
    the size the box parts read (its volume, and the segmented volume's fallback) where a box was drawn
    in millimetres and `bboxes` are the voxels covering it (up to one more on each side). Each dict also
    has "scan_log_tumors": the log of `scan_tumors`, the number of tumors in the scan (None: the boxes'), or
    NaN where the count is not known (`count_known` false: the refit heads then read none, see
    tumornet.fitted.refit_probabilities). `mirror` (retrieval.mirror): the pooled features
    (MIRROR_AVERAGED) are the mean of the scan's and of its left-right mirror image's (the box mirrored
    with it; the network was trained on both, patches.Augment); the rest are the scan's own."""
    count = len(bboxes) if scan_tumors is None else int(scan_tumors)
    if len(bboxes) and count < 1:
        raise InputError(f"scan_tumors: a scan with a tumor box holds at least 1 tumor, got {scan_tumors!r}")
    centre, half = head = head if head is not None else head_box_voxels(image)
    voxel_ml = float(np.prod(np.broadcast_to(np.asarray(spacing_mm, float), 3))) / 1000.0
    extents = [box_size(b) if extents is None or extents[i] is None else extents[i] for i, b in enumerate(bboxes)]
    was_training = model.training
    model.eval()
    try:
        net = _network_parts(model, image, bboxes, extents, patch_size=patch_size, head=head, batch=batch)
        if mirror and len(bboxes):
            flipped, boxes, flipped_head = mirrored(image, bboxes, head)
            seen = _network_parts(model, flipped, boxes, extents, patch_size=patch_size, head=flipped_head,
                                  batch=batch)
            for p, q in zip(net, seen, strict=True):
                p.update({k: ((p[k] + q[k]) / 2).astype(p[k].dtype) for k in MIRROR_AVERAGED})
    finally:
        model.train(was_training)
    out = []
    for bbox, extent, p in zip(bboxes, extents, net, strict=True):
        seg = p.pop("seg_voxels")
        out.append({**p, "box_log_volume": box_log_volume(extent, spacing_mm),
                    "position": ((box_center(bbox) - centre) / half).astype(np.float32),
                    "seg_log_volume": float(np.log(seg * voxel_ml)),
                    "scan_log_tumors": float(np.log(count)) if count_known else float("nan"),
                    "extent": np.asarray(extent, np.float64)})
        if frame is not None:
            out[-1]["template_position"] = frame.position(box_center(bbox))
            out[-1]["atlas"] = frame.atlas(bbox)
    return out


MIRROR_AVERAGED = ("roipool", "roimean", "context")  # tumors_parts(mirror=True): the parts pooled over the
# feature map, the same whichever side the tumor is on; the task logits (left_right would swap), the
# segmentation's volume and span stay the scan's own


def mirrored(image: np.ndarray, bboxes, head) -> tuple[np.ndarray, list[np.ndarray], tuple]:
    """A working-grid scan (RAS) flipped left-right (axis 0) -> (the flipped scan, the boxes and the head
    box (centre, half size) carried with it)."""
    n = image.shape[0]
    boxes = [np.array([n - b[3], b[1], b[2], n - b[0], b[4], b[5]], dtype=np.int64) for b in np.asarray(bboxes)]
    centre, half = head
    return np.ascontiguousarray(image[::-1]), boxes, (np.array([n - 1 - centre[0], *centre[1:]]), half)


def _network_parts(model, image: np.ndarray, bboxes, extents, *, patch_size: int, head, batch: int) -> list[dict]:
    """What the network says of each box (tumors_parts, model in eval mode): {"roipool", "task_logits",
    "roimean", "context", "tumor_span", "span_profile", "seg_voxels": segmented_voxels of the box}."""
    cut = [centred_patch(image, b, patch_size_for(b, patch_size), head) for b in bboxes]
    out: list[dict | None] = [None] * len(cut)
    for size in sorted({c[0].shape[-1] for c in cut}):
        same = [i for i, c in enumerate(cut) if c[0].shape[-1] == size]
        for at in range(0, len(same), batch):
            idx = same[at:at + batch]
            x = torch.from_numpy(np.stack([cut[i][0] for i in idx])).to(model.device)
            boxes = torch.from_numpy(np.array([[n, *cut[i][1]] for n, i in enumerate(idx)], dtype=np.int64))
            frames = torch.from_numpy(np.stack([cut[i][2] for i in idx]))
            boxes = boxes.to(model.device)
            f = model.features(x, frames)
            seg_logits = model.seg_head(f).float()
            foreground = (seg_logits.argmax(1) > 0).cpu().numpy()
            prob = (1.0 - torch.softmax(seg_logits, 1)[:, 0]).cpu().numpy()
            pooled = roi_pool(f, boxes)
            logits = torch.cat([model.task_heads[t](pooled) for t in model.schema.names], 1).float().cpu().numpy()
            emb = pooled.float().cpu().numpy()
            mean = roi_mean_pool(f, boxes).float().cpu().numpy()
            shell = shell_mean_pool(f, boxes).float().cpu().numpy()
            for n, i in enumerate(idx):
                out[i] = {"roipool": emb[n], "task_logits": logits[n], "roimean": mean[n], "context": shell[n],
                          "seg_voxels": segmented_voxels(foreground[n], cut[i][1], extents[i]),
                          "span_profile": span_profile(prob[n], cut[i][1])}
                out[i]["tumor_span"] = span_of(out[i]["span_profile"])
    return out


def tumor_parts(model, image: np.ndarray, bbox, *, patch_size: int, spacing_mm, head=None, frame=None,
                extent=None, scan_tumors: int | None = 1, mirror: bool = False) -> dict:
    """The parts of one tumor box (see tumors_parts) in a scan of `scan_tumors` tumors (None: unknown)."""
    return tumors_parts(model, image, [bbox], patch_size=patch_size, spacing_mm=spacing_mm, head=head,
                        frame=frame, extents=[extent], scan_tumors=scan_tumors or 1,
                        count_known=scan_tumors is not None, mirror=mirror)[0]


def stack_parts(parts: Sequence[Mapping]) -> dict[str, np.ndarray]:
    """One dict of parts per tumor -> one dict of arrays with a leading tumor axis."""
    return {k: np.stack([np.atleast_1d(p[k]) for p in parts]) for k in parts[0]}


def recipe_of(meta: dict) -> tuple[RetrievalConfig, dict | None]:
    """A model file's retrieval recipe and statistics (a model without one: the paper's raw RoiPool)."""
    extra = meta.get("extra", {})
    cfg = RetrievalConfig(**(extra.get("config", {}).get("retrieval") or {}))
    return cfg, extra.get("retrieval_stats")


def _softmax_blocks(logits: np.ndarray, schema: LabelSchema) -> list[np.ndarray]:
    out, start = [], 0
    for t in schema.tasks:
        out.append(_softmax(logits[..., start:start + t.n_classes]))
        start += t.n_classes
    return out


def _task_probabilities(parts: Mapping[str, np.ndarray], cfg: RetrievalConfig, schema: LabelSchema,
                        stats: Mapping | None) -> list[np.ndarray]:
    """Each task's class probabilities (n, n_classes) as the recipe's `tasks` part reads them: the refit
    heads' (`heads: refit`) or the network's task heads', softmax(logits / task_temperature)."""
    if cfg.heads == "refit":
        return refit_probabilities(parts, schema, stats, position_frame=cfg.position_frame,
                                   size_source=cfg.size_source, select=cfg.head_select,
                                   temperature=cfg.task_temperature, scan_count=cfg.scan_count,
                                   count_weight=cfg.count_weight)
    return _softmax_blocks(np.asarray(parts["task_logits"]) / cfg.task_temperature, schema)


def predicted_classes(parts: Mapping[str, np.ndarray], cfg: RetrievalConfig, schema: LabelSchema,
                      stats: Mapping | None) -> dict[str, np.ndarray]:
    """Parts of n tumors -> each task's predicted class index (n,): the likeliest class of the
    probabilities the recipe's vector carries, the refit heads' where it uses them (twelfth round: on
    validation they beat the network's task heads on every task, area 0.57-0.66 -> 0.91-0.93), the
    network's task heads otherwise. What search prints as the query's and the archive's predictions."""
    if cfg.tasks > 0 and (cfg.heads == "network" or stats):
        probs = _task_probabilities(parts, cfg, schema, stats)  # a temperature keeps the likeliest class
    else:
        probs = _softmax_blocks(np.asarray(parts["task_logits"]), schema)
    return {t.name: np.asarray(p).argmax(-1) for t, p in zip(schema.tasks, probs, strict=True)}


def compose(parts: Mapping[str, np.ndarray], cfg: RetrievalConfig, schema: LabelSchema,
            stats: Mapping | None) -> np.ndarray:
    """Parts of n tumors (arrays with a leading n axis) -> (n, D) float32 retrieval vectors."""
    if cfg.needs_stats and not stats:
        raise InputError("retrieval: this recipe needs the training tumors' statistics (the model file has none)")

    blocks = []
    roi = np.asarray(parts["roipool"], dtype=np.float64)
    if cfg.roipool > 0:
        scaled = roi
        if cfg.standardize or cfg.whiten:
            scaled = _z(parts, "roipool", stats)
            if cfg.whiten:
                if "whiten" not in stats["roipool"]:
                    raise InputError("retrieval.whiten: the model file has no whitening of the RoiPool vector "
                                     "(exported before it existed): train again, or set whiten: false")
                scaled = scaled @ np.asarray(stats["roipool"]["whiten"])
            scaled = scaled / np.sqrt(2 * roi.shape[1])
        blocks.append(cfg.roipool * scaled)
    if cfg.tasks > 0:
        blocks += [cfg.tasks * p / np.sqrt(2) for p in _task_probabilities(parts, cfg, schema, stats)]
    if cfg.size > 0 and cfg.size_source == "fit":
        parts = with_fitted_size(parts, stats)
    if cfg.size_units != "log":
        parts = with_diameters(parts)
    if cfg.size > 0:
        blocks.append(cfg.size * _z(parts, cfg.size_key, stats) / np.sqrt(2))
    if cfg.position > 0:
        blocks.append(cfg.position * _z(parts, cfg.position_key, stats) / np.sqrt(2 * 3))
    if cfg.seg_size > 0:
        blocks.append(cfg.seg_size * _z(parts, size_key("seg_log_volume", cfg.size_units), stats) / np.sqrt(2))
    for key in ("roimean", "context"):
        if getattr(cfg, key) > 0:
            blocks.append(getattr(cfg, key) * _z(parts, key, stats) / np.sqrt(2 * roi.shape[1]))
    return np.concatenate(blocks, axis=1).astype(np.float32)


def block_slices(cfg: RetrievalConfig, channels: int, schema: LabelSchema) -> dict[str, slice]:
    """Where each part of `compose`'s vector lies: part -> columns (parts of weight 0 left out)."""
    widths = {"roipool": channels if cfg.roipool > 0 else 0,
              "tasks": sum(t.n_classes for t in schema.tasks) if cfg.tasks > 0 else 0,
              "size": 1 if cfg.size > 0 else 0, "position": 3 if cfg.position > 0 else 0,
              "seg_size": 1 if cfg.seg_size > 0 else 0, "roimean": channels if cfg.roimean > 0 else 0,
              "context": channels if cfg.context > 0 else 0}
    out, at = {}, 0
    for key, n in widths.items():
        if n:
            out[key] = slice(at, at + n)
            at += n
    return out


def rerank_scales(cfg: RetrievalConfig, channels: int, schema: LabelSchema) -> np.ndarray | None:
    """The second stage of a search (`retrieval.rerank`): per column of the vector, the factor that turns
    its first-stage weight into the second stage's (1 but on the size / position parts) -> (D,) array,
    or None when the recipe searches in one stage."""
    if cfg.rerank == 0:
        return None
    blocks = block_slices(cfg, channels, schema)
    scales = np.ones(vector_size(cfg, channels, schema))
    for key in ("size", "position"):
        w = getattr(cfg, f"rerank_{key}")
        if w is not None and key in blocks:
            scales[blocks[key]] = w / getattr(cfg, key)
    return scales


def vector_size(cfg: RetrievalConfig, channels: int, schema: LabelSchema) -> int:
    return max((s.stop for s in block_slices(cfg, channels, schema).values()), default=0)
