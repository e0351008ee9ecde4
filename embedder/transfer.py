"""Read scans between the embedding job's two stages: the CPU tasks that decode a shard's scans and
the (GPU) actors that run the network. A shard's read scans travel as one NumPy .npz (loaded with
allow_pickle=False: arrays only) and a JSON description of each scan; nothing is pickled.
"""

from __future__ import annotations

import io

import numpy as np

from tumornet.scans import Scan
from tumornet.tumors import Tumor
from tumornet.volumes import Volume


def pack(read: Scan | Volume, arrays: dict[str, np.ndarray], prefix: str) -> dict:
    """Put a read scan's arrays into `arrays` (keys `<prefix>_...`) -> its JSON description."""
    volume = read.volume if isinstance(read, Scan) else read
    arrays[f"{prefix}_image"] = volume.array
    arrays[f"{prefix}_affine"] = volume.affine
    meta = {"prefix": prefix, "scan_id": volume.scan_id, "spacing_mm": list(map(float, volume.spacing_mm)),
            "tumors": None}
    if isinstance(read, Scan):
        arrays[f"{prefix}_instances"] = read.instances
        meta["tumors"] = [{"tumor_id": t.tumor_id, "bbox": t.bbox.tolist(), "bbox_mm": t.bbox_mm.tolist(),
                           "centroid_mm": t.centroid_mm.tolist(), "volume_ml": t.volume_ml, "size_mm": t.size_mm,
                           "labels": dict(t.labels)} for t in read.tumors]
    return meta


def unpack(meta: dict, arrays) -> Scan | Volume:
    """The read scan of a description from pack (arrays: the loaded .npz)."""
    p = meta["prefix"]
    volume = Volume(array=arrays[f"{p}_image"], spacing_mm=tuple(meta["spacing_mm"]), affine=arrays[f"{p}_affine"],
                    scan_id=meta["scan_id"])
    if meta["tumors"] is None:
        return volume
    tumors = tuple(Tumor(scan_id=meta["scan_id"], tumor_id=t["tumor_id"], bbox=np.asarray(t["bbox"], dtype=np.int64),
                         bbox_mm=np.asarray(t["bbox_mm"]), centroid_mm=np.asarray(t["centroid_mm"]),
                         volume_ml=t["volume_ml"], size_mm=t["size_mm"], labels=t["labels"]) for t in meta["tumors"])
    return Scan(volume=volume, instances=arrays[f"{p}_instances"], tumors=tumors)


def to_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def from_bytes(blob: bytes):
    return np.load(io.BytesIO(blob), allow_pickle=False)
