"""One scan -> one embedding row per tumor. Pure torch / numpy (the Ray job calls it per scan).

The scan is resampled to the model's training spacing; each tumor gets the patch the network was
trained on (centred on the tumor, the training patch size, enlarged to hold a bigger tumor whole),
and its embedding is the RoiPool vector over the tumor's box in that patch (the paper's retrieval
vector); the task heads give the predicted labels from the same vector.
"""

from __future__ import annotations

import datetime
import hashlib
from collections.abc import Sequence

import numpy as np
import torch

from tumornet.boxes import box_hi, box_lo
from tumornet.errors import InputError
from tumornet.handcrafted import handcrafted_features, head_centre_mm
from tumornet.keys import keyed_id, patient_key
from tumornet.manifest import ManifestRow
from tumornet.network import MultitaskNet
from tumornet.patches import centred_patch
from tumornet.scans import load_scan


def source_hash(rows: Sequence[ManifestRow]) -> str:
    """sha256 over the scan's image and mask file contents (what decides a re-embedding)."""
    h = hashlib.sha256()
    for path in (rows[0].image, rows[0].mask):
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def embed_settings(meta: dict, model_path, *, spacing_mm=None, patch_size: int | None = None):
    """(spacing, patch size) to embed with: the given ones, else those the model was trained with
    (recorded in the model file's extra)."""
    extra = meta["extra"]
    spacing = spacing_mm or extra.get("spacing_mm")
    if spacing is None:
        raise InputError(f"{model_path}: the model records no training spacing; pass --spacing")
    return spacing, int(patch_size or extra.get("patch_size") or 64)


def patch_size_for(bbox: np.ndarray, trained: int) -> int:
    """The training patch size, or the tumor's largest extent + 8 voxels of context, rounded up to x4."""
    need = int(np.max(box_hi(bbox) - box_lo(bbox))) + 8
    return max(trained, -(-need // 4) * 4)


@torch.no_grad()
def embed_scan(model: MultitaskNet, model_id: str, rows: Sequence[ManifestRow], *, spacing_mm, patch_size: int,
               secret: bytes, file_hash: str | None = None, box_fn=None) -> list[dict]:
    """Rows (one scan_id) of a manifest -> shard rows (see embedder.shards.shard_schema).

    box_fn (optional): box -> box, applied to each tumor's box before its patch is cut and pooled
    (the robustness evaluation passes the paper's box distortion); rows then carry the box used."""
    scan = load_scan(rows, spacing_mm=spacing_mm)
    image = scan.volume.array
    centre = head_centre_mm(image, scan.volume.affine)
    tasks = list(model.schema.names)
    now = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    common = {"scan_key": keyed_id(rows[0].scan_id, secret), "patient_key": patient_key(rows[0].patient_id, secret),
              "model_id": model_id, "source_hash": source_hash(rows) if file_hash is None else file_hash,
              "embedded_at": now}
    model.eval()
    out = []
    for t in scan.tumors:
        bbox = t.bbox if box_fn is None else np.asarray(box_fn(t.bbox), dtype=np.int64)
        patch, box = centred_patch(image, bbox, patch_size_for(bbox, patch_size))
        boxes = torch.from_numpy(np.concatenate([[0], box])[None].astype(np.int64))
        res = model(torch.from_numpy(patch[None]).to(model.device), boxes.to(model.device))
        row = dict(common, tumor_id=t.tumor_id, source="mask", bbox=bbox.astype(int).tolist(),
                   bbox_mm=t.bbox_mm.astype(float).tolist(), centroid_mm=t.centroid_mm.astype(float).tolist(),
                   volume_ml=float(t.volume_ml), size_mm=float(t.size_mm),
                   embedding=res["embedding"][0].float().cpu().tolist(),
                   handcrafted=handcrafted_features(image, scan.instances, t, centre).tolist())
        for k in tasks:
            row[f"label_{k}"] = int(t.labels.get(k, -1))
            row[f"pred_{k}"] = int(res["tasks"][k][0].argmax())
        out.append(row)
    return out
