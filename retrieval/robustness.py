"""Robustness to sloppy boxes (the paper's eq. 2): KNN scores when the held-out tumors' boxes are
distorted before they are embedded (per axis log2 scale ~ N(0, 1/3), centre shift ~ size x
N(0, 1/10)), against the training database embedded from exact boxes; `draws` distortions of
every held-out tumor, each scored as its own query set, reported as mean and spread.
"""

from __future__ import annotations

from functools import partial

import numpy as np
import pyarrow as pa

from embedder.embed import embed_scan, embed_settings
from tumornet.boxes import distort_box
from tumornet.drawn import drawn_fit_of
from tumornet.errors import InputError
from tumornet.export import load_model
from tumornet.manifest import read_manifest
from tumornet.recipe import RetrievalConfig

from .evaluate import fmt_metric, load_evaluation, metric_keys, metric_label, recomposed
from .knn import Split, knn_scores


def distorted_queries(model_path, ev, manifest, secret: bytes, *, draws: int, seed: int = 0,
                      log2_scale_sd: float = 1 / 3, shift_sd: float = 0.1, scan_ids=None) -> list[list[dict]]:
    """The query tumors of an evaluation (retrieval.evaluate.load_evaluation; or those of `scan_ids`)
    embedded `draws` times from distorted boxes -> one list of shard rows per draw (the parts included)."""
    if draws < 1:
        raise InputError(f"--draws: expected >= 1, got {draws}")
    model, meta = load_model(model_path)
    spacing, patch, recipe = embed_settings(meta, model_path)
    drawn_fit_of(recipe[0], recipe[1], str(model_path))  # a recipe that reads a regression the file lacks: refused
    scans = read_manifest(manifest, model.schema).scans()
    out = []
    for d in range(draws):
        rng = np.random.default_rng([seed, d])
        box_fn = partial(distort_box, rng=rng, log2_scale_sd=log2_scale_sd, shift_sd=shift_sd)
        out.append([r for s in (ev.test_scans if scan_ids is None else scan_ids)
                    for r in embed_scan(model, meta["model_id"], scans[s], spacing_mm=spacing, patch_size=patch,
                                        secret=secret, file_hash="", box_fn=box_fn, recipe=recipe)])
    return out


def query_split(rows: list[dict], tasks) -> Split:
    """Shard rows -> a query Split of their `embedding`s."""
    return Split(x=np.array([r["embedding"] for r in rows], dtype=np.float32),
                 labels={t: np.array([r[f"label_{t}"] for r in rows]) for t in tasks},
                 size_mm=np.array([r["size_mm"] for r in rows]), patients=np.array([r["patient_key"] for r in rows]))


def robustness(model_path, emb_dir, manifest, secret: bytes, *, k: int = 5, draws: int = 3, seed: int = 0,
               log2_scale_sd: float = 1 / 3, shift_sd: float = 0.1, on: str = "test",
               rerank: int | None = None, retrieval: RetrievalConfig | None = None) -> dict:
    """`on`: the queries, the held-out test patients or the validation patients (as `evaluate --on`);
    `rerank`, `retrieval`: as load_evaluation (with `retrieval`, the distorted queries' vectors are
    recomposed from their parts with that recipe too)."""
    ev = load_evaluation(emb_dir, manifest, secret, model_path, on=on, rerank=rerank, retrieval=retrieval)
    clean = knn_scores(ev.train, ev.test, [k], ev.tasks, rerank=ev.rerank)[k]

    def queries(rows: list[dict]) -> Split:
        split = query_split(rows, ev.tasks)
        return split if retrieval is None else split.with_x(recomposed(pa.Table.from_pylist(rows), retrieval, ev.meta))

    runs = [knn_scores(ev.train, queries(rows), [k], ev.tasks, rerank=ev.rerank)[k]
            for rows in distorted_queries(model_path, ev, manifest, secret, draws=draws, seed=seed,
                                          log2_scale_sd=log2_scale_sd, shift_sd=shift_sd)]
    keys = list(clean)
    return {"model_id": ev.meta["model_id"], "k": k, "draws": draws, "log2_scale_sd": log2_scale_sd,
            "shift_sd": shift_sd, "on": on, "test_tumors": len(ev.test.x), "tasks": list(ev.tasks), "clean": clean,
            "distorted_mean": {key: float(np.mean([r[key] for r in runs])) for key in keys},
            "distorted_sd": {key: float(np.std([r[key] for r in runs])) for key in keys}}


def format_robustness(res: dict) -> str:
    lines = [f"Robustness to distorted boxes (log2 scale sd {res['log2_scale_sd']:.3g}, shift sd "
             f"{res['shift_sd']:.3g} x size; {res['draws']} draws of {res['test_tumors']} held-out tumors; "
             f"K = {res['k']})", "", "| metric | exact boxes | distorted boxes (mean +- sd) |", "|---|---|---|"]
    for key in metric_keys(res["tasks"]):
        m, sd = res["distorted_mean"][key], res["distorted_sd"][key]
        lines.append(f"| {metric_label(key, res['k'])} | {fmt_metric(res['clean'][key], key)} | "
                     f"{fmt_metric(m, key)} +- {fmt_metric(sd, key)} |")
    return "\n".join(lines)
