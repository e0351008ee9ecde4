"""The fused distance + top-k scan (retrieval._flatscan, C): the exact top-k of brute force at any
dimension (8-float lanes and a remainder), fewer rows than k, clear errors; the index uses it."""

import shutil

import numpy as np
import pytest

from retrieval import flatscan

HAS_COMPILER = bool(shutil.which("cc") or shutil.which("gcc") or shutil.which("clang"))
pytestmark = pytest.mark.skipif(not flatscan.available() and not HAS_COMPILER,
                                reason="no C compiler: the extension is optional and FAISS serves")


def test_the_extension_is_compiled_where_a_compiler_is():
    assert flatscan.available(), "retrieval._flatscan did not build: reinstall with `pip install -e .` and read its log"


@pytest.mark.parametrize("d", [1, 7, 8, 32, 33, 128])
def test_the_top_k_is_brute_force_s(d):
    """5003 rows: 625 blocks of 8 rows summed together, and 3 rows one by one."""
    rng = np.random.default_rng(d)
    centres = rng.normal(0, 1, (20, d))
    x = (centres[rng.integers(20, size=5003)] + rng.normal(0, 0.3, (5003, d))).astype(np.float32)
    q = (centres[rng.integers(20, size=7)] + rng.normal(0, 0.3, (7, d))).astype(np.float32)
    dist, idx = flatscan.top_k(x, q, 10)
    exact = ((q[:, None, :].astype(np.float64) - x[None].astype(np.float64)) ** 2).sum(-1)
    order = np.argsort(exact, axis=1, kind="stable")[:, :10]
    assert dist.shape == idx.shape == (7, 10) and idx.dtype == np.int64
    assert (idx == order).all()
    assert np.allclose(dist, np.take_along_axis(exact, order, 1), rtol=1e-5, atol=1e-5)
    assert (np.diff(dist, axis=1) >= 0).all()


def test_the_best_rows_are_found_in_a_block_and_in_the_rows_after_the_last_block():
    x = np.full((21, 4), 10.0, np.float32)  # blocks rows 0-7, 8-15; rows 16-20 one by one
    for r, v in ((3, 1.0), (12, 0.0), (20, 0.5), (17, 2.0)):
        x[r] = v
    dist, idx = flatscan.top_k(x, np.zeros((1, 4), np.float32), 4)
    assert idx.tolist() == [[12, 20, 3, 17]] and dist.tolist() == [[0.0, 1.0, 4.0, 16.0]]


def test_a_rows_remainder_lanes_never_read_the_next_row_into_its_distance():
    """d = 3: a row's lanes past d hold the next rows' floats (inf, nan here), masked off."""
    x = np.ones((40, 3), np.float32)
    x[1::2] = [np.inf, np.nan, np.inf]
    x[10] = [0.0, 0.0, 1.0]
    dist, idx = flatscan.top_k(x, np.zeros((1, 3), np.float32), 3)
    assert idx.tolist() == [[10, 0, 2]] and dist.tolist() == [[1.0, 3.0, 3.0]]


def test_fewer_rows_than_k_are_padded_as_faiss_pads():
    x = np.array([[0.0, 0.0], [3.0, 4.0]], np.float32)
    dist, idx = flatscan.top_k(x, np.array([[3.0, 3.0]], np.float32), 4)
    assert idx.tolist() == [[1, 0, -1, -1]]
    assert dist[0, :2].tolist() == [1.0, 18.0] and np.isinf(dist[0, 2:]).all()


def test_bad_shapes_are_named():
    x = np.zeros((10, 4), np.float32)
    with pytest.raises(ValueError, match="differ in dimension"):
        flatscan.top_k(x, np.zeros((1, 5), np.float32), 3)
    with pytest.raises(ValueError, match="k = 0"):
        flatscan.top_k(x, np.zeros((1, 4), np.float32), 0)


def test_an_exact_index_answers_a_query_with_the_fused_scan(archive, tmp_path):
    from embedder.shards import read_embeddings
    from retrieval.index import build_index, load_index

    emb = tmp_path / "emb"
    shutil.copytree(archive / "emb", emb)
    info = build_index(emb, log=lambda *_: None)
    index = load_index(emb, info["model_id"])
    x = np.stack(read_embeddings(emb)["embedding"].to_numpy(zero_copy_only=False)).astype(np.float32)
    assert index.vectors is not None and index.vectors.shape == x.shape
    d, i = index.search(x[:3], 5)  # the fused scan
    d0, i0 = index.index.search(x[:3], 5)  # FAISS
    assert (i == i0).all() and np.allclose(d, np.sqrt(np.maximum(d0, 0)), atol=1e-4)
