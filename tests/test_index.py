"""The FAISS index beside the shards: same top-5 as brute force, incremental updates, stale index unused."""

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from conftest import SECRET
from embedder.shards import read_embeddings
from retrieval.index import build_index, load_index
from retrieval.knn import nearest
from retrieval.search import search_archived
from tumornet.keys import keyed_id
from tumornet.manifest import read_manifest


def _copy(archive, tmp_path):
    emb = tmp_path / "emb"
    shutil.copytree(archive / "emb", emb)
    return emb


def test_exact_index_gives_the_brute_force_top5(archive, tmp_path):
    emb = _copy(archive, tmp_path)
    info = build_index(emb, log=lambda *_: None)
    t = read_embeddings(emb)
    x = np.stack(t["embedding"].to_numpy(zero_copy_only=False)).astype(np.float32)
    assert info["kind"] == "flat" and info["rows"] == len(x)
    index = load_index(emb, info["model_id"])
    d, i = index.search(x[:10], 5)
    d0, i0 = nearest(x, x[:10], 5)
    keys = [[(index.table["scan_key"][j].as_py(), index.table["tumor_id"][j].as_py()) for j in row] for row in i]
    keys0 = [[(t["scan_key"][j].as_py(), t["tumor_id"][j].as_py()) for j in row] for row in i0]
    assert keys == keys0 and np.allclose(d, d0, atol=1e-4)


def test_approximate_index_above_the_threshold(archive, tmp_path):
    emb = _copy(archive, tmp_path)
    info = build_index(emb, exact_below=10, nprobe=64, log=lambda *_: None)
    assert info["kind"] == "ivf"
    t = read_embeddings(emb)
    x = np.stack(t["embedding"].to_numpy(zero_copy_only=False)).astype(np.float32)
    _, i = load_index(emb, info["model_id"]).search(x, 5)
    _, i0 = nearest(x, x, 5)
    recall = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(i, i0, strict=True)])
    assert recall >= 0.95  # every list probed on this small archive


def test_index_updates_incrementally_and_a_stale_one_is_not_used(archive, small_cohort, tmp_path):
    emb = _copy(archive, tmp_path)
    t = read_embeddings(emb)
    first = t.slice(0, 30)
    (emb / "s.parquet").unlink()
    pq.write_table(first, emb / "a.parquet")
    info = build_index(emb, log=lambda *_: None)
    assert info["rows"] == 30
    pq.write_table(t.slice(30), emb / "b.parquet")  # the next night's shard
    assert load_index(emb, info["model_id"]) is None  # stale: search reads the shards instead
    info = build_index(emb, log=lambda *_: None)
    assert info["rows"] == t.num_rows and load_index(emb, info["model_id"]) is not None
    # a re-embedded scan supersedes rows: rebuilt, each tumor once
    later = t.slice(0, 2).set_column(t.schema.get_field_index("embedded_at"), "embedded_at",
                                     pa.array([t["embedded_at"][0].as_py().replace(year=2030)] * 2,
                                              type=t.schema.field("embedded_at").type))
    pq.write_table(later, emb / "c.parquet")
    info = build_index(emb, log=lambda *_: None)
    assert info["rows"] == read_embeddings(emb).num_rows
    assert json.loads((emb / "index" / f"{info['model_id']}.json").read_text())["rows"] == info["rows"]
    # search uses the index: an archived tumor's hits never include its own patient
    scan = next(s for s in read_manifest(small_cohort).scans().values() if len(s) > 1)
    key = keyed_id(scan[0].scan_id, SECRET)
    own = keyed_id(scan[0].patient_id, SECRET)
    (q,) = search_archived(archive / "model.pt", emb, f"{key}:{scan[0].tumor_id}", k=5)
    assert len(q["hits"]) == 5 and all(h["patient_key"] != own for h in q["hits"])
