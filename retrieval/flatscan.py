"""Exact nearest neighbours by a fused distance + top-k scan (the C extension retrieval._flatscan).

A query reads every vector once and keeps its k best in the same pass; FAISS's flat scan does the
same work through a heap and costs 1.4-1.6x a plain pass over the array on one core (README,
Performance; `benchmarks/search_speed.py` measures both). The extension is built by the package's
install (setup.py) where a C compiler is found; without it `available()` is False and callers use
FAISS (retrieval.index).
"""

from __future__ import annotations

import numpy as np

try:
    from . import _flatscan
except ImportError:  # not compiled here: FAISS's flat scan serves
    _flatscan = None

MAX_DIM = 512


def available() -> bool:
    return _flatscan is not None


def top_k(x: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k nearest rows of `x` (n, d) to each query `q` (m, d) -> (squared distances (m, k), row
    indices (m, k)), nearest first; with fewer than k rows the rest are -1 at +inf (as FAISS)."""
    if _flatscan is None:
        raise RuntimeError("retrieval._flatscan is not compiled (reinstall the package with a C compiler)")
    x = np.ascontiguousarray(x, dtype=np.float32)
    q = np.ascontiguousarray(np.atleast_2d(q), dtype=np.float32)
    if x.ndim != 2 or q.shape[1] != x.shape[1]:
        raise ValueError(f"top_k: vectors {x.shape} and queries {q.shape} differ in dimension")
    if not 1 <= x.shape[1] <= MAX_DIM or k < 1:
        raise ValueError(f"top_k: dimension {x.shape[1]} (1 to {MAX_DIM}) or k = {k} (>= 1) out of range")
    dist = np.empty((len(q), k), np.float32)
    idx = np.empty((len(q), k), np.int64)
    for i in range(len(q)):
        _flatscan.top_k(x, q[i], k, dist[i], idx[i])
    return dist, idx
