"""KNN evaluation of an embedding archive on the held-out split (`ray_job.py evaluate`).

The split is the training split (by patient, `data.test_fraction`, `data.split_seed`), recomputed
from the manifest and matched to the shards' keyed scan ids with the site's secret: training
tumors are the database, held-out tumors the queries.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from embedder.shards import read_embeddings
from tumornet.cohort import keyed_id, read_manifest, split_scan_ids
from tumornet.config import Config
from tumornet.errors import InputError

from .knn import Split, baselines, knn_scores

K_CURVE = (1, 3, 5, 10, 20)


def load_splits(emb_dir, manifest, secret: bytes, cfg: Config, *, model_id: str | None = None):
    """-> (train Split, held-out Split, model id, tasks)."""
    table = read_embeddings(emb_dir, model_id=model_id)
    models = sorted(set(table["model_id"].to_pylist()))
    if len(models) != 1:
        raise InputError(f"{emb_dir}: shards of {len(models)} models {models}: choose one with --model-id")
    tasks = [t for t in cfg.tasks.names if f"label_{t}" in table.column_names]
    train_ids, test_ids = split_scan_ids(read_manifest(manifest, cfg.tasks), test_fraction=cfg.data.test_fraction,
                                         seed=cfg.data.split_seed)
    side = {keyed_id(s, secret): "train" for s in train_ids} | {keyed_id(s, secret): "test" for s in test_ids}
    where = np.array([side.get(k, "") for k in table["scan_key"].to_pylist()])
    x = np.stack(table["embedding"].to_numpy(zero_copy_only=False)).astype(np.float32)
    labels = {t: np.asarray(table[f"label_{t}"].to_numpy(), dtype=np.int64) for t in tasks}
    size = np.asarray(table["size_mm"].to_numpy(), dtype=np.float64)

    def part(name: str) -> Split:
        m = where == name
        return Split(x=x[m], labels={t: v[m] for t, v in labels.items()}, size_mm=size[m])

    train, test = part("train"), part("test")
    if len(train.x) == 0 or len(test.x) == 0:
        raise InputError(f"{emb_dir}: {len(train.x)} training and {len(test.x)} held-out tumors match {manifest} "
                         "with this secret (another archive, or another site key?)")
    return train, test, models[0], tasks


def evaluate(emb_dir, manifest, secret: bytes, cfg: Config, *, k: int = 5, ks: Sequence[int] = K_CURVE,
             model_id: str | None = None) -> dict:
    train, test, mid, tasks = load_splits(emb_dir, manifest, secret, cfg, model_id=model_id)
    ks = sorted(set(ks) | {k})
    curve = knn_scores(train, test, ks, tasks)
    return {"model_id": mid, "k": k, "train_tumors": len(train.x), "test_tumors": len(test.x), "tasks": tasks,
            "knn": curve[k], "baseline": baselines(train, test, tasks), "k_curve": {str(q): curve[q] for q in ks}}


def fmt_metric(v: float, pct: bool) -> str:
    return "n/a" if math.isnan(v) else (f"{100 * v:.1f} %" if pct else f"{v:.2f}")


def format_evaluation(res: dict) -> str:
    keys = [f"acc_{t}" for t in res["tasks"]] + ["rmse_size_mm"]
    lines = [f"KNN evaluation of model {res['model_id']}: {res['test_tumors']} held-out tumors searched among "
             f"{res['train_tumors']} training tumors", "",
             f"| metric | KNN (K = {res['k']}) | no embedding (majority / mean size) |", "|---|---|---|"]
    for key in keys:
        pct = key.startswith("acc_")
        name = key[4:] + " accuracy" if pct else "size RMSE (mm)"
        lines.append(f"| {name} | {fmt_metric(res['knn'][key], pct)} | {fmt_metric(res['baseline'][key], pct)} |")
    ks = list(res["k_curve"])
    lines += ["", "K curve:", "", "| metric | " + " | ".join(f"K = {q}" for q in ks) + " |",
              "|---|" + "---|" * len(ks)]
    for key in keys:
        pct = key.startswith("acc_")
        lines.append(f"| {key} | " + " | ".join(fmt_metric(res["k_curve"][q][key], pct) for q in ks) + " |")
    return "\n".join(lines)


def _plain(v):
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_plain(x) for x in v]
    return None if isinstance(v, float) and math.isnan(v) else v


def write_evaluation(res: dict, path: str | Path) -> None:
    """JSON (a metric that could not be computed is null)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(_plain(res), indent=2))
