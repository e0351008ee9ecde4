"""Search: the archive tumors most similar to a new scan's tumors (`ray_job.py search`).

The query scan (image + tumor mask, any orientation and spacing) is embedded exactly as the archive
was (embedder.embed.embed_scan with the same model), and each of its tumors gets the K archive
tumors nearest to it in embedding space (Euclidean), with their keys, distance, size and labels.
The query itself is never written anywhere.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from embedder.embed import embed_scan, embed_settings
from embedder.shards import read_embeddings
from tumornet.errors import InputError
from tumornet.export import load_model
from tumornet.labels import MISSING
from tumornet.manifest import ManifestRow
from tumornet.scans import read_instances
from tumornet.volumes import read_label_map

from .knn import nearest

QUERY_KEY = b"query-scan-no-patient-key"  # the query's keys are computed, never output


def query_rows(image: str | Path, mask: str | Path, *, binary: bool = False, tumor_ids=None) -> list[ManifestRow]:
    """The query scan as manifest rows, one per tumor: an instance mask (each value a tumor) or,
    with binary, every connected component of the non-zero voxels."""
    image, mask = Path(image).resolve(), Path(mask).resolve()
    for p in (image, mask):
        if not p.is_file():
            raise InputError(f"{p}: file not found")
    values = None
    if binary:
        raw, _ = read_label_map(mask)
        values = tuple(int(v) for v in np.unique(raw) if v != 0)
    first = ManifestRow(row=0, patient_id="query", scan_id="query", image=image, mask=mask, tumor_id=0, labels={},
                        tumor_values=values)
    ids = [int(v) for v in np.unique(read_instances(first)[0]) if v != 0]
    if tumor_ids:
        missing = sorted(set(tumor_ids) - set(ids))
        if missing:
            raise InputError(f"{mask}: no tumor {missing} in the mask (it has {ids})")
        ids = [i for i in ids if i in set(tumor_ids)]
    if not ids:
        raise InputError(f"{mask}: empty mask (no tumor voxel)")
    return [replace(first, tumor_id=i) for i in ids]


def search(model_path, emb_dir, rows: list[ManifestRow], *, k: int = 5) -> list[dict]:
    """-> one entry per query tumor: its size, predicted labels and its k nearest archive tumors."""
    if k < 1:
        raise InputError(f"--k: expected >= 1, got {k}")
    model, meta = load_model(model_path)
    mid = meta["model_id"]
    table = read_embeddings(emb_dir, model_id=mid)
    if table.num_rows == 0:
        raise InputError(f"{emb_dir}: no tumor embedded with model {mid}; embed the archive with this model first")
    spacing, patch, recipe = embed_settings(meta, model_path)
    queries = embed_scan(model, mid, rows, spacing_mm=spacing, patch_size=patch, secret=QUERY_KEY, file_hash="",
                         recipe=recipe)
    x = np.stack(table["embedding"].to_numpy(zero_copy_only=False)).astype(np.float32)
    dist, idx = nearest(x, np.array([q["embedding"] for q in queries], dtype=np.float32), k)
    schema = model.schema
    archive = table.drop_columns(["embedding"]).to_pylist()

    def names(row: dict, prefix: str) -> dict:
        return {t: (schema[t].classes[row[f"{prefix}_{t}"]] if row[f"{prefix}_{t}"] != MISSING else None)
                for t in schema.names}

    out = []
    for q, d_row, i_row in zip(queries, dist, idx, strict=True):
        hits = [{"rank": r + 1, "distance": float(d), "scan_key": archive[i]["scan_key"],
                 "patient_key": archive[i]["patient_key"], "tumor_id": archive[i]["tumor_id"],
                 "size_mm": archive[i]["size_mm"], "labels": names(archive[i], "label")}
                for r, (d, i) in enumerate(zip(d_row, i_row, strict=True))]
        out.append({"tumor_id": q["tumor_id"], "size_mm": q["size_mm"], "predicted": names(q, "pred"), "hits": hits})
    return out


def format_search(results: list[dict]) -> str:
    lines = []
    for q in results:
        pred = ", ".join(f"{t} {v}" for t, v in q["predicted"].items())
        lines += [f"query tumor {q['tumor_id']}: {q['size_mm']:.1f} mm; predicted {pred}", "",
                  "| rank | distance | scan_key | tumor | size mm | " + " | ".join(q["predicted"]) + " |",
                  "|---|---|---|---|---|" + "---|" * len(q["predicted"])]
        for h in q["hits"]:
            cells = [str(h["rank"]), f"{h['distance']:.3f}", h["scan_key"], str(h["tumor_id"]), f"{h['size_mm']:.1f}"]
            lines.append("| " + " | ".join(cells + [v or "?" for v in h["labels"].values()]) + " |")
        lines.append("")
    return "\n".join(lines).rstrip()
