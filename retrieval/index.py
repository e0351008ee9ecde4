"""A vector index beside the embedding shards (`ray_job.py index`), so that a query never re-reads
every shard: FAISS, exact (IndexFlatL2) up to `exact_below` vectors, approximate above (IVF-Flat
with about 4 sqrt(n) lists, `nprobe` of them searched); one per model id.

    <embeddings>/index/<model_id>.faiss       the FAISS index (written whole: temp file + rename)
    <embeddings>/index/<model_id>.parquet     one row per vector, in index order: the shard columns
                                              search shows (keys, tumor id, size, labels)
    <embeddings>/index/<model_id>.json        kind, rows, nprobe, and the shard files it covers

Incremental: a re-run after a nightly job adds only the rows of new shard files when no indexed row
was superseded (a re-embedded scan, a compaction); otherwise it rebuilds. An index that no longer
matches the shard files is not used (search says so and falls back to reading the shards).

A query of an exact index is answered by the fused distance + top-k scan (retrieval.flatscan: one
pass over the index's own vectors) where the extension is compiled, a few queries are asked and k is
small; otherwise by FAISS (a batch of queries: its BLAS path; a large k: its heap).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from embedder.shards import newest_rows, read_shard_files, shard_files, tumor_rows
from tumornet.errors import InputError
from tumornet.io import atomic_write, atomic_write_text

from . import flatscan

VECTOR_COLUMNS = ("embedding", "roipool", "task_logits", "handcrafted", "roimean", "context")
FUSED_MAX_QUERIES = 20  # FAISS's own switch to BLAS (distance_compute_blas_threshold)
FUSED_MAX_K = 256  # the fused scan keeps its k best sorted by insertion


def _faiss():
    import faiss

    return faiss


def _paths(emb_dir: Path, model_id: str) -> tuple[Path, Path, Path]:
    d = Path(emb_dir) / "index"
    return d / f"{model_id}.faiss", d / f"{model_id}.parquet", d / f"{model_id}.json"


def _files_state(files: list[Path]) -> dict[str, list[int]]:
    return {f.name: [f.stat().st_size, f.stat().st_mtime_ns] for f in files}


def _model_files(emb_dir: Path, model_id: str | None) -> tuple[str, list[Path]]:
    files = shard_files(emb_dir)
    if not files:
        raise InputError(f"{emb_dir}: no embedding shards (*.parquet)")
    by_model: dict[str, list[Path]] = {}
    for f in files:
        for mid in set(pq.read_table(f, columns=["model_id"])["model_id"].to_pylist()):
            by_model.setdefault(mid, []).append(f)
    if model_id is None:
        if len(by_model) != 1:
            raise InputError(f"{emb_dir}: shards of {len(by_model)} models {sorted(by_model)}: "
                             "choose one with --model-id")
        model_id = next(iter(by_model))
    if model_id not in by_model:
        raise InputError(f"{emb_dir}: no tumor embedded with model {model_id}")
    return model_id, by_model[model_id]


def build_index(emb_dir, *, model_id: str | None = None, exact_below: int = 100_000, nprobe: int = 32,
                log=print) -> dict:
    """Build or update the index of one model's rows -> its description (also `<model_id>.json`)."""
    faiss = _faiss()
    emb_dir = Path(emb_dir)
    model_id, files = _model_files(emb_dir, model_id)
    index_path, meta_path, info_path = _paths(emb_dir, model_id)
    table = tumor_rows(newest_rows(read_shard_files(files, model_id)))
    if table.num_rows == 0:  # every scan of the model removed (forget) or without a tumor: no index
        for path in (index_path, meta_path, info_path):
            path.unlink(missing_ok=True)
        log(f"index: model {model_id} has no tumor rows in {emb_dir}: no index")
        return {"model_id": model_id, "kind": None, "rows": 0}
    keys_now = list(zip(table["scan_key"].to_pylist(), table["tumor_id"].to_pylist(),
                        table["embedded_at"].to_pylist(), strict=True))
    info = json.loads(info_path.read_text()) if info_path.is_file() and index_path.is_file() else None
    mode = "built"
    if info is not None:
        old = pq.read_table(meta_path)
        old_keys = list(zip(old["scan_key"].to_pylist(), old["tumor_id"].to_pylist(), old["embedded_at"].to_pylist(),
                            strict=True))
        still = set(keys_now)
        kind_ok = info["kind"] == ("flat" if len(keys_now) <= exact_below else "ivf")
        if kind_ok and all(k in still for k in old_keys):  # nothing indexed was superseded: add the new rows
            known = set(old_keys)
            new_rows = np.array([i for i, k in enumerate(keys_now) if k not in known], dtype=np.int64)
            index = faiss.read_index(str(index_path))
            if len(new_rows):
                index.add(_vectors(table.take(pa.array(new_rows))))
            table = pa.concat_tables([old, table.take(pa.array(new_rows)).drop_columns(
                [c for c in VECTOR_COLUMNS if c in table.column_names])], promote_options="default")
            mode = f"updated (+{len(new_rows)} rows)"
        else:
            info = None
    if info is None:
        x = _vectors(table)
        n, d = x.shape
        if n <= exact_below:
            index, kind = faiss.IndexFlatL2(d), "flat"
        else:
            nlist = int(4 * math.sqrt(n))
            index, kind = faiss.IndexIVFFlat(faiss.IndexFlatL2(d), d, nlist), "ivf"
            rng = np.random.default_rng(0)
            index.train(x[rng.choice(n, size=min(n, 64 * nlist), replace=False)])
        index.add(x)
        table = table.drop_columns([c for c in VECTOR_COLUMNS if c in table.column_names])
    kind = "flat" if isinstance(index, faiss.IndexFlatL2) else "ivf"
    atomic_write(index_path, lambda tmp: faiss.write_index(index, tmp))
    atomic_write(meta_path, lambda tmp: pq.write_table(table, tmp))
    info = {"model_id": model_id, "kind": kind, "rows": int(index.ntotal), "nprobe": nprobe,
            "shards": _files_state(files)}
    atomic_write_text(info_path, json.dumps(info, indent=2))
    log(f"index: {mode}: {info['rows']} vectors of model {model_id}, {kind} -> {index_path}")
    return info


def refresh_indexes(emb_dir, model_ids, log=print) -> dict[str, str]:
    """Rebuild the existing indexes of `model_ids` after their rows changed other than by new shards
    (embedder.forget: the removed rows must leave the index files too), each of its own kind and nprobe
    -> {model id: "rebuilt" | "removed"} (removed: no tumor row of that model is left)."""
    out = {}
    for mid in model_ids:
        index_path, _, info_path = _paths(Path(emb_dir), mid)
        if not info_path.is_file():
            continue
        old = json.loads(info_path.read_text())
        index_path.unlink(missing_ok=True)  # built again whole, never updated
        info = build_index(emb_dir, model_id=mid, exact_below=2**62 if old["kind"] == "flat" else 0,
                           nprobe=old.get("nprobe", 32), log=log)
        out[mid] = "rebuilt" if info["rows"] else "removed"
    return out


def _vectors(table: pa.Table) -> np.ndarray:
    return np.ascontiguousarray(np.stack(table["embedding"].to_numpy(zero_copy_only=False)).astype(np.float32))


class Index:
    """A loaded index: `search(q (n, D), k)` -> (squared distances, row indices), and `table`, the
    rows in index order (no vectors)."""

    def __init__(self, index, table: pa.Table, info: dict):
        self.index, self.table, self.info = index, table, info
        self.vectors = None  # an exact index's own vectors (a view), for the fused scan
        if info["kind"] == "ivf":
            index.nprobe = info["nprobe"]
        elif flatscan.available() and index.ntotal > 0:
            self.vectors = _faiss().rev_swig_ptr(index.get_xb(), index.ntotal * index.d).reshape(index.ntotal, index.d)

    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        q, k = np.ascontiguousarray(np.atleast_2d(q), dtype=np.float32), min(k, self.index.ntotal)
        if self.vectors is not None and len(q) <= FUSED_MAX_QUERIES and k <= FUSED_MAX_K:
            d, i = flatscan.top_k(self.vectors, q, k)
        else:
            d, i = self.index.search(q, k)
        return np.sqrt(np.maximum(d, 0)), i


def load_index(emb_dir, model_id: str) -> Index | None:
    """The model's index when it exists and covers exactly the current shard files; else None."""
    index_path, meta_path, info_path = _paths(Path(emb_dir), model_id)
    if not (index_path.is_file() and info_path.is_file() and meta_path.is_file()):
        return None
    info = json.loads(info_path.read_text())
    _, files = _model_files(Path(emb_dir), model_id)
    if info.get("shards") != _files_state(files):
        return None
    return Index(_faiss().read_index(str(index_path)), pq.read_table(meta_path), info)
