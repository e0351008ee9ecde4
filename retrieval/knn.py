"""The paper's evaluation: K-nearest-neighbour retrieval scores of a set of vectors.

For each query tumor (the held-out split), its K nearest database tumors (the training split;
Euclidean distance) are retrieved, never from the query's own patient (the paper's examples are
"from different patients"; a follow-up scan of the same patient would otherwise be a near copy).
Per task:
- accuracy: the K neighbours vote the query's label (a tie goes to the tied class seen nearest);
- precision@K: the share of the K neighbours that have the query's class;
- mAP@K: mean over queries of AP@K = sum_{i <= K} P@i x rel_i / min(K, R), where rel_i says the
  i-th neighbour has the query's class and R is how many database tumors have it (0 when R = 0).
Size: the mean linear size of the K neighbours predicts the query's; RMSE in mm.
A recipe that searches in two stages (`retrieval.rerank`, tumornet.descriptor.rerank_scales) takes the
M nearest and re-orders them by the distance with some parts weighed again: `rerank` = (M, per-column
scales); the K neighbours are then the first K of the re-ordered M.
A missing label is left out: a query without a label for a task is not scored on it, and database
tumors without one are not retrieved for it (the K nearest that have one are).

`no_embedding` gives what needs no embedding: majority-class accuracy, random retrieval's expected
precision@K and AP@K (the frequency of the query's class in the database) and the RMSE of
predicting the mean training size.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np
from sklearn.neighbors import NearestNeighbors

from tumornet.descriptor import rerank_scales
from tumornet.errors import InputError
from tumornet.labels import MISSING, LabelSchema
from tumornet.recipe import RetrievalConfig

METRICS = ("acc", "precision", "map")  # per task: f"{metric}_{task}"; and "rmse_size_mm"


@dataclass(frozen=True, kw_only=True)
class Split:
    """Vectors (n, C), labels {task: (n,) int, -1 missing}, sizes (n,) mm and patient keys (n,) of tumors."""

    x: np.ndarray
    labels: Mapping[str, np.ndarray]
    size_mm: np.ndarray
    patients: np.ndarray | None = None  # None: every tumor its own patient

    def __post_init__(self) -> None:
        n = len(self.x)
        if (self.x.ndim != 2 or len(self.size_mm) != n or any(len(v) != n for v in self.labels.values())
                or (self.patients is not None and len(self.patients) != n)):
            raise InputError(f"Split: embeddings {self.x.shape}, sizes {self.size_mm.shape}, labels and patients "
                             "disagree")

    def subset(self, rows: np.ndarray) -> Split:
        return Split(x=self.x[rows], labels={t: v[rows] for t, v in self.labels.items()}, size_mm=self.size_mm[rows],
                     patients=None if self.patients is None else self.patients[rows])

    def with_x(self, x: np.ndarray) -> Split:
        return Split(x=x, labels=self.labels, size_mm=self.size_mm, patients=self.patients)


def nearest(db: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(distances, indices), each (len(q), min(k, len(db))): the nearest rows of db by Euclidean
    distance, nearest first."""
    nn = NearestNeighbors(n_neighbors=min(k, len(db)), algorithm="brute").fit(db)
    return nn.kneighbors(q)


Rerank = tuple[int, np.ndarray]  # (candidates M, per-column scales of the second stage's distance)


def recipe_rerank(cfg: RetrievalConfig, meta: dict, width: int, where: str, *,
                  candidates: int | None = None) -> Rerank | None:
    """A recipe's second search stage for vectors of `width` columns (None: one stage); `candidates`:
    that many in the first stage instead of the recipe's (`--rerank`; 0: one stage)."""
    if candidates is not None:
        try:
            cfg = replace(cfg, rerank=candidates)
        except InputError as e:
            raise InputError(f"--rerank: {e}") from None
    scales = rerank_scales(cfg, int(meta["model_config"]["channels"]), LabelSchema.from_dict(meta["tasks"]))
    if scales is None:
        return None
    if len(scales) != width:
        raise InputError(f"{where}: vectors of {width} numbers, but the recipe composes {len(scales)}: embed again")
    return cfg.rerank, scales


def neighbours(db: Split, q: Split, k: int, *, chunk: int = 1024, rerank: Rerank | None = None) -> np.ndarray:
    """(len(q), k) indices into db, nearest first, never from the query's own patient; -1 where
    fewer than k database tumors are from other patients. `rerank` (M, scales): the M nearest
    re-ordered by the distance of the columns times `scales` (ties keep the first stage's order), any
    neighbours beyond the M after them as they were."""
    if rerank is not None and rerank[0] > 1:
        m, scales = rerank
        cand = neighbours(db, q, max(m, k), chunk=chunk)  # the first m re-ordered, any beyond them kept
        for s in range(0, len(q.x), chunk):
            c = cand[s:s + chunk, :m]
            diff = (db.x[np.maximum(c, 0)].astype(np.float64) - q.x[s:s + chunk, None].astype(np.float64)) * scales
            d = np.where(c >= 0, (diff**2).sum(-1), np.inf)
            cand[s:s + chunk, :m] = np.take_along_axis(c, d.argsort(1, kind="stable"), 1)
        return cand[:, :k]
    k_eff = min(k, len(db.x))
    out = np.full((len(q.x), k), -1, dtype=np.int64)
    db64 = db.x.astype(np.float64)
    db_sq = (db64**2).sum(1)
    for s in range(0, len(q.x), chunk):
        qx = q.x[s:s + chunk].astype(np.float64)
        d = (qx**2).sum(1)[:, None] + db_sq[None] - 2 * qx @ db64.T
        if q.patients is not None and db.patients is not None:
            d[q.patients[s:s + chunk, None] == db.patients[None]] = np.inf
        part = np.argpartition(d, k_eff - 1, axis=1)[:, :k_eff] if k_eff < len(db.x) else np.tile(
            np.arange(len(db.x)), (len(qx), 1))
        order = np.take_along_axis(d, part, 1).argsort(1, kind="stable")
        idx = np.take_along_axis(part, order, 1)
        idx[np.take_along_axis(d, idx, 1) == np.inf] = -1
        out[s:s + chunk, :k_eff] = idx
    return out


def _vote(labels: np.ndarray) -> int:
    """Majority label of neighbours given nearest first; a tie goes to the tied class seen nearest."""
    values, counts = np.unique(labels, return_counts=True)
    best = values[counts == counts.max()]
    return int(next(v for v in labels if v in best))


def _task_scores(db_labels: np.ndarray, nb: np.ndarray, truth: np.ndarray, relevant: np.ndarray, k: int):
    """nb (n, >= k) indices (-1 none); relevant (n,): database tumors of the query's class -> (acc, P@k, mAP@k)."""
    acc, prec, ap = [], [], []
    for row, y, r in zip(nb, truth, relevant, strict=True):
        row = row[:k][row[:k] >= 0]
        if len(row) == 0:
            acc.append(0.0), prec.append(0.0), ap.append(0.0)
            continue
        rel = db_labels[row] == y
        acc.append(float(_vote(db_labels[row]) == y))
        prec.append(float(rel.sum()) / k)
        p_at = np.cumsum(rel) / np.arange(1, len(rel) + 1)
        ap.append(float((p_at * rel).sum()) / min(k, r) if r else 0.0)
    return float(np.mean(acc)), float(np.mean(prec)), float(np.mean(ap))


def knn_scores(db: Split, q: Split, ks: Sequence[int], tasks: Sequence[str], *,
               rerank: Rerank | None = None) -> dict[int, dict[str, float]]:
    """-> {K: {"acc_<task>", "precision_<task>", "map_<task>", ..., "rmse_size_mm"}} for every K in ks
    (`rerank`: a two-stage search, see neighbours)."""
    if len(db.x) == 0 or len(q.x) == 0:
        raise InputError(f"KNN evaluation needs database and query tumors (got {len(db.x)} and {len(q.x)})")
    if min(ks) < 1:
        raise InputError(f"K must be >= 1, got {list(ks)}")
    kmax = max(ks)
    out: dict[int, dict[str, float]] = {k: {} for k in ks}
    for t in tasks:
        known_db = np.flatnonzero(db.labels[t] != MISSING)
        known_q = np.flatnonzero(q.labels[t] != MISSING)
        if len(known_db) == 0 or len(known_q) == 0:
            for k in ks:
                out[k].update({f"{m}_{t}": float("nan") for m in METRICS})
            continue
        sub_db, sub_q = db.subset(known_db), q.subset(known_q)
        nb = neighbours(sub_db, sub_q, kmax, rerank=rerank)
        truth = sub_q.labels[t]
        same = sub_db.labels[t][None] == truth[:, None]
        if sub_q.patients is not None and sub_db.patients is not None:
            same &= sub_q.patients[:, None] != sub_db.patients[None]
        relevant = same.sum(1)
        for k in ks:
            a, p, m = _task_scores(sub_db.labels[t], nb, truth, relevant, k)
            out[k].update({f"acc_{t}": a, f"precision_{t}": p, f"map_{t}": m})
    nb = neighbours(db, q, kmax, rerank=rerank)
    for k in ks:
        sizes = np.where(nb[:, :k] >= 0, db.size_mm[nb[:, :k]], np.nan)
        pred = np.nanmean(sizes, axis=1)
        out[k]["rmse_size_mm"] = float(np.sqrt(np.nanmean((pred - q.size_mm) ** 2)))
    return out


def no_embedding(db: Split, q: Split, tasks: Sequence[str]) -> dict[str, float]:
    """What needs no embedding: majority-class accuracy, random retrieval's expected precision and
    AP (the database frequency of the query's class), the RMSE of the mean training size."""
    out = {}
    for t in tasks:
        d, y = db.labels[t][db.labels[t] != MISSING], q.labels[t][q.labels[t] != MISSING]
        if len(d) and len(y):
            freq = np.bincount(d, minlength=int(max(d.max(), y.max())) + 1) / len(d)
            out[f"acc_{t}"] = float(np.mean(y == freq.argmax()))
            out[f"precision_{t}"] = out[f"map_{t}"] = float(np.mean(freq[y]))
        else:
            out.update({f"{m}_{t}": float("nan") for m in METRICS})
    out["rmse_size_mm"] = float(np.sqrt(np.mean((db.size_mm.mean() - q.size_mm) ** 2)))
    return out


ORACLE_LABEL_MM = 100.0  # a label mismatch outweighs any size difference (tumors < 100 mm): labels first


def oracle(db: Split, q: Split, tasks: Sequence[str], *, label_mm: float = ORACLE_LABEL_MM) -> tuple[Split, Split]:
    """The retrieval that knows the truth, as vectors: per task the one-hot of the true label times
    label_mm / sqrt(2) (missing: zeros), then the true linear size in mm, so that the squared
    distance of two tumors is label_mm^2 per task they disagree on plus their size difference^2.
    Scored like any embedding (knn_scores), it bounds what any retrieval of this archive can reach:
    with label_mm large the K neighbours share as many labels as the database allows and are the
    closest in size among those; a smaller label_mm trades one label for label_mm of size (the
    frontier of labels against size)."""
    cols = []
    for t in tasks:
        both = np.concatenate([db.labels[t], q.labels[t]])
        n = int(both.max()) + 1 if (both >= 0).any() else 1
        onehot = np.zeros((len(both), n))
        known = both >= 0
        onehot[np.flatnonzero(known), both[known]] = label_mm / np.sqrt(2)
        cols.append(onehot)
    cols.append(np.concatenate([db.size_mm, q.size_mm])[:, None])
    x = np.concatenate(cols, axis=1).astype(np.float64)
    return db.with_x(x[:len(db.x)]), q.with_x(x[len(db.x):])


def standardize(db: Split, *others: Split) -> list[Split]:
    """z-score every column with the database's mean and sd (a constant column is left at 0)."""
    mu, sd = db.x.mean(0), db.x.std(0)
    sd = np.where(sd > 0, sd, 1.0)
    return [s.with_x(((s.x - mu) / sd).astype(np.float32)) for s in (db, *others)]
