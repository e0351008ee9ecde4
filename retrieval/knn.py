"""The paper's evaluation: K-nearest-neighbour prediction from the embeddings.

For each held-out tumor, its K nearest training tumors (Euclidean distance between RoiPool
embeddings) vote its label, per task; its linear size is predicted as their mean size. Reported:
accuracy per task and RMSE (mm) of the size, for any K (the paper's K = 5, and a K curve), next to
the majority-class accuracy and the RMSE of predicting the mean training size (what a useless
embedding scores). A missing label is left out: a held-out tumor without a label for a task is not
scored on it, and a training tumor without one does not vote on it (the K nearest that have one do).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from sklearn.neighbors import NearestNeighbors

from tumornet.errors import InputError
from tumornet.labels import MISSING


@dataclass(frozen=True, kw_only=True)
class Split:
    """Embeddings (n, C), labels {task: (n,) int, -1 missing} and sizes (n,) mm of a set of tumors."""

    x: np.ndarray
    labels: Mapping[str, np.ndarray]
    size_mm: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.x)
        if self.x.ndim != 2 or len(self.size_mm) != n or any(len(v) != n for v in self.labels.values()):
            raise InputError(f"Split: embeddings {self.x.shape}, sizes {self.size_mm.shape} and labels disagree")


def nearest(db: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(distances, indices), each (len(q), min(k, len(db))): the nearest rows of db by Euclidean
    distance, nearest first."""
    nn = NearestNeighbors(n_neighbors=min(k, len(db)), algorithm="brute").fit(db)
    return nn.kneighbors(q)


def _neighbours(db: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    return nearest(db, q, k)[1]


def _vote(labels: np.ndarray) -> int:
    """Majority label of neighbours given nearest first; a tie goes to the tied class seen nearest."""
    values, counts = np.unique(labels, return_counts=True)
    best = values[counts == counts.max()]
    return int(next(v for v in labels if v in best))


def knn_scores(train: Split, test: Split, ks: Sequence[int], tasks: Sequence[str]) -> dict[int, dict[str, float]]:
    """-> {K: {"acc_<task>": ..., "rmse_size_mm": ...}} for every K in ks."""
    if len(train.x) == 0 or len(test.x) == 0:
        raise InputError(f"KNN evaluation needs training and held-out tumors (got {len(train.x)} and {len(test.x)})")
    kmax = max(ks)
    out: dict[int, dict[str, float]] = {k: {} for k in ks}
    for t in tasks:
        known_db = np.flatnonzero(train.labels[t] != MISSING)
        known_q = np.flatnonzero(test.labels[t] != MISSING)
        if len(known_db) == 0 or len(known_q) == 0:
            for k in ks:
                out[k][f"acc_{t}"] = float("nan")
            continue
        nb = known_db[_neighbours(train.x[known_db], test.x[known_q], kmax)]
        truth = test.labels[t][known_q]
        for k in ks:
            pred = np.array([_vote(train.labels[t][row[:k]]) for row in nb])
            out[k][f"acc_{t}"] = float(np.mean(pred == truth))
    nb = _neighbours(train.x, test.x, kmax)
    for k in ks:
        pred = train.size_mm[nb[:, :k]].mean(axis=1)
        out[k]["rmse_size_mm"] = float(np.sqrt(np.mean((pred - test.size_mm) ** 2)))
    return out


def baselines(train: Split, test: Split, tasks: Sequence[str]) -> dict[str, float]:
    """What needs no embedding: majority-class accuracy per task, RMSE of the mean training size."""
    out = {}
    for t in tasks:
        db, q = train.labels[t][train.labels[t] != MISSING], test.labels[t][test.labels[t] != MISSING]
        out[f"acc_{t}"] = float(np.mean(q == np.bincount(db).argmax())) if len(db) and len(q) else float("nan")
    out["rmse_size_mm"] = float(np.sqrt(np.mean((train.size_mm.mean() - test.size_mm) ** 2)))
    return out
