"""KNN evaluation of an embedding archive on the model's held-out split (`ray_job.py evaluate`).

The split comes from the model file (the keyed ids of its training and held-out patients, recorded
at export), never from a config passed again: the training split's tumors are the database, the
held-out split's tumors the queries. Shard rows are matched to the manifest's scans through their
keyed scan ids (the site's secret). Four rows are scored with the same protocol (retrieval.knn):
the learned embedding, the handcrafted baseline (tumornet.handcrafted, standardized on the training
split), what needs no embedding, and the oracle that knows every tumor's true labels and size
(retrieval.knn.oracle: the best this archive allows, e.g. how close in size five neighbours that
share the query's labels can be).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from embedder.shards import read_embeddings
from tumornet.descriptor import compose, recipe_of
from tumornet.errors import InputError
from tumornet.export import load_model
from tumornet.io import atomic_write_text, read_json_record
from tumornet.keys import keyed_id
from tumornet.labels import LabelSchema
from tumornet.manifest import read_manifest
from tumornet.recipe import RetrievalConfig
from tumornet.split import SIDES, split_of_model

from .knn import Rerank, Split, knn_scores, no_embedding, oracle, recipe_rerank, standardize

K_CURVE = tuple(range(1, 21))
ROW_NAMES = {"learned": "learned", "handcrafted": "handcrafted", "no_embedding": "no embedding",
             "oracle": "oracle (true labels, then size)"}
ROWS = ("learned", "handcrafted", "no_embedding", "oracle")  # "oracle": evaluations written since the tenth session


@dataclass(frozen=True, kw_only=True)
class Evaluation:
    """The held-out (queries) and training (database) tumors of one model's shards."""

    train: Split  # learned embeddings
    test: Split
    train_hand: Split  # handcrafted vectors, standardized on the training split
    test_hand: Split
    meta: dict  # the model file's metadata
    tasks: tuple[str, ...]
    test_scans: tuple[str, ...]  # held-out scan ids of the manifest
    train_scans: tuple[str, ...]  # the database's scan ids of the manifest
    table: pa.Table  # the model's shard rows
    train_rows: np.ndarray  # indices of table rows in train / test
    test_rows: np.ndarray
    rerank: Rerank | None = None  # the recipe's second search stage (retrieval.knn.neighbours), if any


def load_evaluation(emb_dir, manifest, secret: bytes, model_path, *, on: str = "test",
                    retrieval: RetrievalConfig | None = None, rerank: int | None = None) -> Evaluation:
    """The database and query tumors of the model's split (`on`: test, or validation to choose a
    recipe on); `retrieval`: score another recipe of the same model, recomposed from the shards'
    parts (tumornet.descriptor) instead of their `embedding` column; `rerank`: the recipe's search with
    that many candidates in its first stage instead (0: one stage; the vectors are the same)."""
    _, meta = load_model(model_path)
    mid = meta["model_id"]
    schema = LabelSchema.from_dict(meta["tasks"])
    cohort = read_manifest(manifest, schema, check_files=False)
    train_ids, test_ids = split_of_model(cohort, meta, where=str(model_path), on=on)
    table = read_embeddings(emb_dir, model_id=mid)
    if table.num_rows == 0:
        raise InputError(f"{emb_dir}: no tumor embedded with model {mid} ({model_path}); embed the archive first")
    if "handcrafted" not in table.column_names:
        raise InputError(f"{emb_dir}: shards without the handcrafted column (written by an older version); embed "
                         "the archive again into a new folder")
    tasks = tuple(t for t in cohort.schema.names if f"label_{t}" in table.column_names)
    side = {keyed_id(s, secret): "train" for s in train_ids} | {keyed_id(s, secret): "test" for s in test_ids}
    where = np.array([side.get(k, "") for k in table["scan_key"].to_pylist()])
    if retrieval is None:
        x = np.stack(table["embedding"].to_numpy(zero_copy_only=False)).astype(np.float32)
    else:
        x = recomposed(table, retrieval, meta)
    full = Split(x=x,
                 labels={t: np.asarray(table[f"label_{t}"].to_numpy(), dtype=np.int64) for t in tasks},
                 size_mm=np.asarray(table["size_mm"].to_numpy(), dtype=np.float64),
                 patients=np.asarray(table["patient_key"].to_pylist()))
    train_rows, test_rows = np.flatnonzero(where == "train"), np.flatnonzero(where == "test")
    train, test = full.subset(train_rows), full.subset(test_rows)
    rerank = recipe_rerank(retrieval or recipe_of(meta)[0], meta, x.shape[1], str(emb_dir), candidates=rerank)
    if len(train.x) == 0 or len(test.x) == 0:
        raise InputError(f"{emb_dir}: {len(train.x)} training and {len(test.x)} held-out tumors match {manifest} "
                         "with this secret (another archive, or another site key?)")
    hand = np.stack(table["handcrafted"].to_numpy(zero_copy_only=False)).astype(np.float32)
    train_hand, test_hand = standardize(train.with_x(hand[where == "train"]), test.with_x(hand[where == "test"]))
    return Evaluation(train=train, test=test, train_hand=train_hand, test_hand=test_hand, meta=meta, tasks=tasks,
                      test_scans=tuple(test_ids), train_scans=tuple(train_ids), table=table,
                      train_rows=train_rows, test_rows=test_rows, rerank=rerank)


def recomposed(table: pa.Table, retrieval: RetrievalConfig, meta: Mapping) -> np.ndarray:
    """Shard rows' vectors composed again from their stored parts with another recipe of the same model
    (its training statistics and refit heads from the model file's metadata `meta`)."""
    schema = LabelSchema.from_dict(meta["tasks"])
    return compose(shard_parts(table), retrieval, schema, meta["extra"].get("retrieval_stats"))


NULLABLE_PARTS = ("roimean", "context", "template_position", "atlas")  # shard columns older shards lack or leave null


def shard_parts(table: pa.Table) -> dict[str, np.ndarray]:
    """The retrieval parts of shard rows (tumornet.descriptor.tumor_parts), stacked."""
    if "roipool" not in table.column_names:
        raise InputError("shards without the retrieval parts (written by an older version): embed again")
    return {"roipool": np.stack(table["roipool"].to_numpy(zero_copy_only=False)),
            "task_logits": np.stack(table["task_logits"].to_numpy(zero_copy_only=False)),
            "box_log_volume": np.asarray(table["box_log_volume"].to_numpy(), dtype=np.float64),
            "position": np.stack(table["position"].to_numpy(zero_copy_only=False)),
            **({"seg_log_volume": np.asarray(table["seg_log_volume"].to_numpy(), dtype=np.float64)}
               if "seg_log_volume" in table.column_names else {}),
            **({"scan_log_tumors": _scan_log_tumors(table)}
               if "scan_tumors" in table.column_names and table["scan_tumors"].null_count == 0 else {}),
            **{k: np.stack(table[k].to_numpy(zero_copy_only=False)) for k in NULLABLE_PARTS
               if k in table.column_names and table[k].null_count == 0}}


def evaluate(emb_dir, manifest, secret: bytes, model_path, *, k: int = 5, ks: Sequence[int] = K_CURVE,
             on: str = "test", retrieval: RetrievalConfig | None = None, rerank: int | None = None,
             oracle_mm: Sequence[float] = ()) -> dict:
    """-> the evaluation record: learned / handcrafted / no-embedding / oracle rows at K, K curves, the
    split (`retrieval`, `rerank`: as load_evaluation); `oracle_mm`: the oracle's frontier too, one row
    per label weight (a label worth that many mm of size, retrieval.knn.oracle)."""
    ev = load_evaluation(emb_dir, manifest, secret, model_path, on=on, retrieval=retrieval, rerank=rerank)
    ks = sorted(set(ks) | {k})
    learned = knn_scores(ev.train, ev.test, ks, ev.tasks, rerank=ev.rerank)
    hand = knn_scores(ev.train_hand, ev.test_hand, ks, ev.tasks)
    extra = ev.meta["extra"]
    split = extra["split"]
    frontier = {}
    for mm in oracle_mm:
        if not mm > 0:
            raise InputError(f"--oracle-frontier: each label weight must be > 0 mm, got {mm}")
        frontier[f"{mm:g}"] = knn_scores(*oracle(ev.train, ev.test, ev.tasks, label_mm=mm), [k], ev.tasks)[k]
    return {"model_id": ev.meta["model_id"], "run": extra.get("run"), "steps": extra.get("steps"), "k": k, "on": on,
            "rerank": ev.rerank[0] if ev.rerank else 0,
            "tasks": list(ev.tasks), "train_tumors": len(ev.train.x), "test_tumors": len(ev.test.x),
            "split": {"test_fraction": split["test_fraction"], "seed": split["seed"],
                      "validation_fraction": split.get("validation_fraction", 0.0),
                      **{f"{k}_patients": len(split.get(f"{k}_patients", ())) for k in SIDES}},
            "rows": {"learned": learned[k], "handcrafted": hand[k],
                     "no_embedding": no_embedding(ev.train, ev.test, ev.tasks),
                     "oracle": knn_scores(*oracle(ev.train, ev.test, ev.tasks), [k], ev.tasks)[k]},
            "k_curve": {"learned": {str(q): learned[q] for q in ks}, "handcrafted": {str(q): hand[q] for q in ks}},
            **({"oracle_frontier": frontier} if frontier else {})}


def metric_label(key: str, k: int | None = None) -> str:
    """acc_area -> "area accuracy"; precision_area -> "area precision@K"; rmse_size_mm -> "size RMSE (mm)"."""
    if key == "rmse_size_mm":
        return "size RMSE (mm)"
    metric, task = key.split("_", 1)
    at = f"@{k}" if k else ""
    return f"{task} " + {"acc": "accuracy", "precision": f"precision{at}", "map": f"mAP{at}"}[metric]


def fmt_metric(v: float | None, key: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{v:.2f}" if key == "rmse_size_mm" else f"{100 * v:.1f} %"


def metric_keys(tasks: Sequence[str]) -> list[str]:
    return [f"{m}_{t}" for t in tasks for m in ("acc", "precision", "map")] + ["rmse_size_mm"]


def format_evaluation(res: dict) -> str:
    rows = res["rows"]
    columns = [r for r in ROWS if r in rows]
    on = res.get("on", "test")
    lines = [f"KNN evaluation of model {res['model_id']}: {res['test_tumors']} {on} tumors searched among "
             f"{res['train_tumors']} database tumors of other patients (split recorded in the model: "
             f"{res['split'][f'{on}_patients']} {on} patients"
             + (f"; two-stage search, the {res['rerank']} nearest re-ordered)" if res.get("rerank") else ")"), "",
             f"| metric (K = {res['k']}) | " + " | ".join(ROW_NAMES[r] for r in columns) + " |",
             "|---|" + "---|" * len(columns)]
    for key in metric_keys(res["tasks"]):
        lines.append(f"| {metric_label(key, res['k'])} | " + " | ".join(fmt_metric(rows[r].get(key), key)
                                                                     for r in columns) + " |")
    curve = res["k_curve"]["learned"]
    shown = [q for q in ("1", "3", "5", "10", "20") if q in curve]
    lines += ["", "K curve of the learned embedding:", "",
              "| metric | " + " | ".join(f"K = {q}" for q in shown) + " |", "|---|" + "---|" * len(shown)]
    for key in [f"acc_{t}" for t in res["tasks"]] + ["rmse_size_mm"]:
        lines.append(f"| {metric_label(key)} | " + " | ".join(fmt_metric(curve[q][key], key) for q in shown) + " |")
    if res.get("oracle_frontier"):
        keys = [f"acc_{t}" for t in res["tasks"]] + ["rmse_size_mm"]
        lines += ["", "The oracle's frontier (true labels and sizes; a label worth that many mm of size):", "",
                  "| a label is worth | " + " | ".join(metric_label(key) for key in keys) + " |",
                  "|---|" + "---|" * len(keys)]
        lines += [f"| {mm} mm | " + " | ".join(fmt_metric(row[key], key) for key in keys) + " |"
                  for mm, row in res["oracle_frontier"].items()]
    return "\n".join(lines)


def plain(v):
    """JSON-ready: NaN -> null, recursively."""
    if isinstance(v, dict):
        return {k: plain(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [plain(x) for x in v]
    return None if isinstance(v, float) and math.isnan(v) else v


def write_evaluation(res: dict, path: str | Path) -> None:
    """JSON (a metric that could not be computed is null)."""
    atomic_write_text(path, json.dumps(plain(res), indent=2))


def read_evaluation(path: str | Path) -> dict:
    """An evaluation written by `write_evaluation` (`ray_job.py evaluate --out`)."""
    return read_json_record(path, "evaluation", ("rows", "k_curve", "tasks", "k"), "ray_job.py evaluate --out")


def _scan_log_tumors(table: pa.Table) -> np.ndarray:
    """Shard rows' `scan_log_tumors` part: the log of their scan's tumor count, NaN (not known, not read)
    for tumors found without a mask (embedder.embed.embed_scan)."""
    count = np.log(np.asarray(table["scan_tumors"].to_numpy(), dtype=np.float64))
    if "source" in table.column_names:
        count[np.asarray(table["source"].to_pylist()) == "predicted"] = np.nan
    return count
