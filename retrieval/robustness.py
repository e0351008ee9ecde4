"""Robustness to sloppy boxes (the paper's eq. 2): KNN scores when the held-out tumors' boxes are
distorted before they are embedded (per axis log2 scale ~ N(0, 1/3), centre shift ~ size x
N(0, 1/10)), against the training database embedded from exact boxes; `draws` distortions of
every held-out tumor, each scored as its own query set, reported as mean and spread.
"""

from __future__ import annotations

from functools import partial

import numpy as np

from embedder.embed import embed_scan, embed_settings
from tumornet.boxes import distort_box
from tumornet.cohort import read_manifest, split_scan_ids
from tumornet.config import Config
from tumornet.errors import InputError
from tumornet.export import load_model

from .evaluate import fmt_metric, load_splits
from .knn import Split, knn_scores


def robustness(model_path, emb_dir, manifest, secret: bytes, cfg: Config, *, k: int = 5, draws: int = 3,
               seed: int = 0, log2_scale_sd: float = 1 / 3, shift_sd: float = 0.1) -> dict:
    if draws < 1:
        raise InputError(f"--draws: expected >= 1, got {draws}")
    model, meta = load_model(model_path)
    train, test, mid, tasks = load_splits(emb_dir, manifest, secret, cfg, model_id=meta["model_id"])
    spacing, patch = embed_settings(meta, model_path)
    cohort = read_manifest(manifest, cfg.tasks)
    _, held_out = split_scan_ids(cohort, test_fraction=cfg.data.test_fraction, seed=cfg.data.split_seed)
    scans = cohort.scans()
    clean = knn_scores(train, test, [k], tasks)[k]
    runs = []
    for d in range(draws):
        rng = np.random.default_rng([seed, d])
        box_fn = partial(distort_box, rng=rng, log2_scale_sd=log2_scale_sd, shift_sd=shift_sd)
        rows = [r for s in held_out
                for r in embed_scan(model, mid, scans[s], spacing_mm=spacing, patch_size=patch, secret=secret,
                                    file_hash="", box_fn=box_fn)]
        q = Split(x=np.array([r["embedding"] for r in rows], dtype=np.float32),
                  labels={t: np.array([r[f"label_{t}"] for r in rows]) for t in tasks},
                  size_mm=np.array([r["size_mm"] for r in rows]))
        runs.append(knn_scores(train, q, [k], tasks)[k])
    keys = list(clean)
    return {"model_id": mid, "k": k, "draws": draws, "log2_scale_sd": log2_scale_sd, "shift_sd": shift_sd,
            "test_tumors": len(test.x), "clean": clean,
            "distorted_mean": {key: float(np.mean([r[key] for r in runs])) for key in keys},
            "distorted_sd": {key: float(np.std([r[key] for r in runs])) for key in keys}}


def format_robustness(res: dict) -> str:
    lines = [f"Robustness to distorted boxes (log2 scale sd {res['log2_scale_sd']:.3g}, shift sd "
             f"{res['shift_sd']:.3g} x size; {res['draws']} draws of {res['test_tumors']} held-out tumors; "
             f"K = {res['k']})", "", "| metric | exact boxes | distorted boxes (mean +- sd) |", "|---|---|---|"]
    for key, v in res["clean"].items():
        pct = key.startswith("acc_")
        m, sd = res["distorted_mean"][key], res["distorted_sd"][key]
        name = key[4:] + " accuracy" if pct else "size RMSE (mm)"
        lines.append(f"| {name} | {fmt_metric(v, pct)} | {fmt_metric(m, pct)} +- {fmt_metric(sd, pct)} |")
    return "\n".join(lines)
