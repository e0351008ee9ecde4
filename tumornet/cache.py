"""Preprocessed scans on disk: each scan is decoded, resampled and normalized once, then memory-mapped.

Files are named by a content key (sha256 of the cache version, image and mask paths, their sizes
and modification times, the spacing and the manifest rows' tumor ids), never by scan or patient
id. Arrays are .npy (read with allow_pickle=False, mmap), tumors a small JSON. Writes are atomic.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .boxes import make_box
from .io import atomic_write, atomic_write_text
from .manifest import ManifestRow
from .patches import TumorBox
from .scans import load_scan
from .tumors import tumor_extent

CACHE_VERSION = 2  # 2: each tumor's extent (tumornet.tumors.tumor_extent)


@dataclass(frozen=True, kw_only=True)
class CachedScan:
    key: str
    image_path: Path
    instances_path: Path
    tumors: tuple[TumorBox, ...]
    spacing_mm: tuple[float, float, float]

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(image float32, instances int32), memory-mapped read-only."""
        return (np.load(self.image_path, mmap_mode="r", allow_pickle=False),
                np.load(self.instances_path, mmap_mode="r", allow_pickle=False))


def scan_key(rows: Sequence[ManifestRow], spacing_mm) -> str:
    first = rows[0]
    parts = [str(CACHE_VERSION), repr(spacing_mm), repr(first.tumor_values), repr([r.tumor_id for r in rows])]
    for p in (first.image, first.mask):
        st = os.stat(p)
        parts += [str(p), str(st.st_size), str(st.st_mtime_ns)]
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:24]


def prepare_scan(rows: Sequence[ManifestRow], *, spacing_mm, cache_dir: str | Path) -> CachedScan:
    """Load one scan through the cache (decode + resample + normalize only on a miss)."""
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    key = scan_key(rows, spacing_mm)
    image_path, inst_path, meta_path = (cache / f"{key}{s}" for s in ("-image.npy", "-instances.npy", ".json"))
    if not meta_path.is_file():
        scan = load_scan(rows, spacing_mm=spacing_mm)
        atomic_write(image_path, lambda p: np.save(p, scan.volume.array.astype(np.float32)))
        atomic_write(inst_path, lambda p: np.save(p, scan.instances.astype(np.int32)))
        meta = {"spacing_mm": list(scan.volume.spacing_mm),
                "tumors": [{"tumor_id": t.tumor_id, "bbox": t.bbox.tolist(), "labels": dict(t.labels),
                            "size_mm": t.size_mm,
                            "extent": tumor_extent(t, scan.volume.affine, scan.volume.array.shape).tolist()}
                           for t in scan.tumors]}
        atomic_write_text(meta_path, json.dumps(meta))
    meta = json.loads(meta_path.read_text())
    tumors = tuple(TumorBox(tumor_id=t["tumor_id"], bbox=make_box(t["bbox"][:3], t["bbox"][3:]), labels=t["labels"],
                            extent=np.asarray(t["extent"], dtype=np.float64)) for t in meta["tumors"])
    return CachedScan(key=key, image_path=image_path, instances_path=inst_path, tumors=tumors,
                      spacing_mm=tuple(meta["spacing_mm"]))
