"""The paper's experiments as one command each (`ray_job.py experiment`): a list of variants, each a
set of config overrides on top of one config; every variant is trained (Ray Train + DeepSpeed),
its whole cohort embedded (Ray Data) and scored with the same KNN protocol (learned vs
handcrafted at K), on the same data, split and budget. Each row records the model id, steps, wall
time and split; each variant's full config is written beside its row.

    widths:   --channels 16,32,64,96            (paper Tab. 2)
    ablation: --variants configs/ablation.yaml  (paper Tab. 3: which losses train the network)
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import yaml

from embedder.job import run_embedding
from trainer.launch import run_training
from tumornet.config import Config, config_to_dict, find_config, with_overrides
from tumornet.errors import InputError
from tumornet.io import atomic_write_text, read_json_record

from .evaluate import evaluate, fmt_metric, metric_label, plain


def width_variants(channels: list[int]) -> dict[str, dict]:
    if not channels or min(channels) < 1:
        raise InputError(f"--channels: expected positive widths, got {channels}")
    return {f"c{c}": {"model": {"channels": c}} for c in channels}


def read_variants(path: str | Path) -> dict[str, dict]:
    """A YAML mapping variant name -> config overrides by section (e.g. `seg_only: {loss: {task: 0}}`)."""
    p = find_config(path)  # a path, or a bundled file by name (`ablation`)
    try:
        d = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise InputError(f"{p}: not valid YAML ({e})") from None
    if not isinstance(d, dict) or not d:
        raise InputError(f"{p}: expected a mapping variant name -> overrides")
    for name, o in d.items():
        if not isinstance(o, dict) or not all(isinstance(v, dict) for v in o.values()):
            raise InputError(f"{p}: {name}: expected a mapping section -> {{key: value}}, got {o!r}")
    return {str(k): (v or {}) for k, v in d.items()}


def _derive(cfg: Config, overrides: Mapping[str, Mapping], where: str) -> Config:
    try:
        return with_overrides(cfg, **{s: dict(v) for s, v in overrides.items()})
    except (InputError, TypeError) as e:
        raise InputError(f"{where}: {e}") from None


def run_experiment(title: str, cfg: Config, variants: Mapping[str, Mapping], *, manifest, secret_file, out_dir,
                   k: int = 5, log=print) -> dict:
    """Train, embed and score every variant -> the experiment record, also written as
    `<out_dir>/<name>.json` (the report's --experiment input) and `<out_dir>/<name>.md`.

    Variants that differ only in their `retrieval` recipe share one training and one embedding (the
    recipe is applied to the shards' parts). With `data.validation_fraction` > 0 the scores are on
    the validation patients (choosing a recipe never looks at the test patients), else on the test
    patients."""
    from tumornet.keys import read_secret

    out = Path(out_dir).resolve()
    secret = read_secret(secret_file)
    derived = {name: _derive(cfg, o, f"variant {name}") for name, o in variants.items()}  # all checked first
    on = "validation" if cfg.data.validation_fraction > 0 else "test"
    trained: dict[str, dict] = {}  # training config (without the recipe) -> its run
    rows = []
    for i, (name, vcfg) in enumerate(derived.items(), start=1):
        vdir = out / name
        vcfg = with_overrides(vcfg, distributed={"storage_path": str(out / "runs")})
        atomic_write_text(vdir / "config.json", json.dumps(config_to_dict(vcfg), indent=2))
        key = json.dumps({s: v for s, v in config_to_dict(vcfg).items() if s != "retrieval"}, sort_keys=True)
        if key not in trained:
            log(f"[{title} {i}/{len(derived)}] {name}: training")
            t0 = time.perf_counter()
            summary = run_training(vcfg, manifest=manifest, run_name=f"{cfg.name}-{name}", fresh=True)
            log(f"[{title} {i}/{len(derived)}] {name}: embedding")
            run_embedding(manifest=manifest, model_path=summary["model"], out_dir=vdir / "embeddings",
                          secret_file=secret_file, workers=vcfg.distributed.workers,
                          threads_per_worker=vcfg.distributed.cpus_per_worker, log=lambda *_: None)
            trained[key] = {"variant": name, "model": summary["model"], "embeddings": vdir / "embeddings",
                            "wall_s": round(time.perf_counter() - t0, 1)}
        run = trained[key]
        res = evaluate(run["embeddings"], manifest, secret, run["model"], k=k, ks=[k], on=on,
                       retrieval=vcfg.retrieval)
        rows.append({"variant": name, "overrides": plain(dict(variants[name])), "model_id": res["model_id"],
                     "trained_as": run["variant"], "steps": res["steps"], "wall_s": run["wall_s"],
                     "split": res["split"], "config": str(vdir / "config.json"), "learned": res["rows"]["learned"],
                     "handcrafted": res["rows"]["handcrafted"], "no_embedding": res["rows"]["no_embedding"]})
        log(f"[{title} {i}/{len(derived)}] {name}: " + ", ".join(
            f"{metric_label(m)} {res['rows']['learned'][m]:.2f}" for m in res["rows"]["learned"] if m.startswith("acc_")
            or m == "rmse_size_mm"))
    record = {"title": title, "k": k, "on": on, "tasks": res["tasks"], "rows": rows}
    atomic_write_text(out / f"{_slug(title)}.json", json.dumps(plain(record), indent=2))
    atomic_write_text(out / f"{_slug(title)}.md", format_experiment(record))
    return record


def _slug(title: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in title.lower()).strip("-")


def format_experiment(exp: dict) -> str:
    keys = [f"acc_{t}" for t in exp["tasks"]] + ["rmse_size_mm"]
    lines = [f"{exp['title']} (KNN, K = {exp['k']}, {exp.get('on', 'test')} patients; each variant's config "
             "beside its row)", "",
             "| variant | embedding | " + " | ".join(metric_label(key) for key in keys) + " | steps | wall s |",
             "|---|---|" + "---|" * (len(keys) + 2)]
    for r in exp["rows"]:
        for emb in ("learned", "handcrafted"):
            lines.append(f"| {r['variant']} | {emb} | " + " | ".join(fmt_metric(r[emb].get(key), key) for key in keys)
                         + f" | {r['steps']} | {r['wall_s']:.0f} |")
    return "\n".join(lines) + "\n"


def read_experiment(path: str | Path) -> dict:
    return read_json_record(path, "experiment table", ("title", "k", "tasks", "rows"), "ray_job.py experiment")


GRID = {"roipool": (0.0, 0.5, 1.0), "tasks": (0.0, 0.5, 1.0, 2.0), "size": (0.0, 0.5, 1.0, 2.0),
        "position": (0.5, 1.0, 2.0, 3.0), "seg_size": (0.0, 0.5, 1.0, 2.0), "heads": ("network", "refit")}
NEWER_PARTS = {"seg_size": "seg_log_volume", "roimean": "roimean", "context": "context"}  # weight -> shard column


def read_grid(path: str | Path) -> dict[str, tuple]:
    """A YAML grid: retrieval key -> list of values (e.g. `roimean: [0, 0.5, 1]`), for recipe-grid.
    Keys are those of the `retrieval` config section but `standardize` (a grid standardizes); a key
    left out takes the default GRID's values, or the config default where GRID has none."""
    from dataclasses import fields

    from tumornet.fitted import HEAD_SELECT, POSITION_FRAMES, SIZE_SOURCES, SIZE_UNITS
    from tumornet.recipe import RetrievalConfig

    p = find_config(path)
    try:
        d = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise InputError(f"{p}: not valid YAML ({e})") from None
    known = {f.name for f in fields(RetrievalConfig)} - {"standardize", "mirror"}
    if not isinstance(d, dict) or not d:
        raise InputError(f"{p}: expected a mapping retrieval key -> list of values")
    for key, values in d.items():
        if key == "mirror":
            raise InputError(f"{p}: mirror: a grid composes the shards' parts, and the mirror image's come from the "
                             "network: retune the model with retrieval.mirror and embed the archive again instead")
        if key not in known:
            raise InputError(f"{p}: unknown grid key {key!r} (expected one of {', '.join(sorted(known))})")
        if not isinstance(values, list) or not values:
            raise InputError(f"{p}: {key}: expected a non-empty list of values, got {values!r}")
        for v in values:
            number = isinstance(v, int | float) and not isinstance(v, bool)
            ok = (v in ("network", "refit") if key == "heads" else v in HEAD_SELECT if key == "head_select"
                  else isinstance(v, bool) if key in ("whiten", "frame_skips_tumors", "scan_count", "refine_box")
                  else v in POSITION_FRAMES if key == "position_frame" else v in SIZE_UNITS if key == "size_units"
                  else v in SIZE_SOURCES if key == "size_source"
                  else isinstance(v, int) and not isinstance(v, bool) and v >= 0 if key in ("head_draws", "rerank")
                  else v is None or (number and v >= 0) if key in ("rerank_size", "rerank_position")
                  else number and (v > 0 if key in ("task_temperature", "count_weight") else v >= 0))
            if not ok:
                want = {"heads": "network or refit", "whiten": "true or false", "frame_skips_tumors": "true or false",
                        "scan_count": "true or false", "refine_box": "true or false",
                        "position_frame": "head, template or atlas", "size_units": "log or mm",
                        "size_source": "box, seg or fit", "head_select": ", ".join(HEAD_SELECT),
                        "head_draws": "a whole number >= 0",
                        "rerank": "a whole number >= 0", "rerank_size": "a weight >= 0 or null",
                        "rerank_position": "a weight >= 0 or null",
                        "task_temperature": "a number > 0", "count_weight": "a number > 0"}.get(key, "a weight >= 0")
                raise InputError(f"{p}: {key}: expected {want}, got {v!r}")
    return {**GRID, **{k: tuple(v) for k, v in d.items()}}


TASK_SCORE = ("tumor_type", "area", "left_right", "front_rear", "upper_lower")


def recipe_score(row: Mapping[str, float]) -> float:
    """How a recipe is chosen on validation: mean KNN@K accuracy over the five tasks minus 0.02 per mm
    of size RMSE (a 1 mm better size counts as much as 2 points of accuracy on one task... / 5)."""
    return sum(row[f"acc_{t}"] for t in TASK_SCORE) / len(TASK_SCORE) - 0.02 * row["rmse_size_mm"]


def recipe_grid(model, embeddings, manifest, secret: bytes, *, k: int = 5, grid: Mapping = GRID,
                draws: int = 0) -> list[dict]:
    """Every retrieval recipe of the grid (RoiPool standardized), scored on the model's validation
    patients from the shards' parts (no training) -> rows, best first. The parts are standardized
    with the statistics of the database (training) tumors' parts in the shards, and `heads: refit`
    uses heads refit on them, so a part newer than the model file can be scored too. draws > 0: the
    validation tumors are also embedded that many times from distorted boxes (the paper's eq. 2,
    retrieval.robustness) and a recipe's score is the mean of its clean and distorted scores (a
    recipe must survive a rough box)."""
    import itertools

    import pyarrow as pa

    from tumornet.descriptor import compose
    from tumornet.fitted import fit_heads, fit_size, fit_stats, head_inputs
    from tumornet.labels import LabelSchema
    from tumornet.recipe import RetrievalConfig

    from .evaluate import load_evaluation, shard_parts
    from .knn import knn_scores, recipe_rerank
    from .robustness import distorted_queries, query_split

    ev = load_evaluation(embeddings, manifest, secret, model, on="validation")
    schema = LabelSchema.from_dict(ev.meta["tasks"])
    parts = shard_parts(ev.table)
    for key, column in NEWER_PARTS.items():
        if any(v > 0 for v in grid.get(key, ())) and column not in parts:
            raise InputError(f"{embeddings}: shards without {column} (written by an older version): embed again")
    frames = set(grid.get("position_frame", ("head",)))
    needed = {c for f in frames if f != "head" for c in head_inputs(f) if c in ("template_position", "atlas")}
    if missing := sorted(needed - parts.keys()):
        raise InputError(f"{embeddings}: shards without {', '.join(missing)} (written by an older version, or by a "
                         "recipe that reads no position): embed again")
    train_parts = {key: v[ev.train_rows] for key, v in parts.items()}
    base = fit_stats([{key: v[i] for key, v in parts.items()} for i in ev.train_rows])
    base.update(fit_size(train_parts, ev.train.size_mm, base))
    head_draws = sorted(set(grid.get("head_draws", (0,))))
    # rough-box copies of the database tumors for the refit heads (another seed than the queries')
    rough = [(shard_parts(pa.Table.from_pylist(rows)), query_split(rows, ev.tasks))
             for rows in (distorted_queries(model, ev, manifest, secret, draws=max(head_draws), seed=1,
                                            scan_ids=ev.train_scans) if max(head_draws) else [])]
    counts = sorted(set(grid.get("scan_count", (False,))))
    if True in counts and "scan_log_tumors" not in parts:
        raise InputError(f"{embeddings}: shards without scan_tumors (written by an older version): embed again")
    # (position frame, size source, head draws, head select, scan count, count weight) -> statistics and heads
    stats_of = {}
    weights = sorted(set(grid.get("count_weight", (1.0,))))
    for frame, source, n, select, count, weight in itertools.product(
            sorted(frames), sorted(set(grid.get("size_source", ("box",)))), head_draws,
            sorted(set(grid.get("head_select", ("fixed",)))), counts, weights):
        if weight != 1 and not count:
            continue
        on = [(train_parts, ev.train), *rough[:n]]
        fit_on = {key: np.concatenate([p[key] for p, _ in on]) for key in train_parts if all(key in p for p, _ in on)}
        labels = {t: np.concatenate([s.labels[t] for _, s in on]) for t in ev.train.labels}
        stats_of[frame, source, n, select, count, weight] = {**base, "heads": fit_heads(
            fit_on, labels, schema, base, position_frame=frame, size_source=source, select=select,
            groups=np.concatenate([s.patients for _, s in on]), scan_count=count, count_weight=weight)}
    distorted = [(query_split(rows, ev.tasks), shard_parts(pa.Table.from_pylist(rows)))
                 for rows in (distorted_queries(model, ev, manifest, secret, draws=draws) if draws else [])]
    hand = knn_scores(ev.train_hand, ev.test_hand, [k], ev.tasks)[k]
    rows = []
    for values in itertools.product(*grid.values()):
        w = dict(zip(grid, values, strict=True))
        if (all(w.get(key, 0) == 0 for key in ("roipool", "tasks", "roimean", "context"))
                or (w["tasks"] == 0 and w.get("heads") == "refit") or (w.get("whiten") and w["roipool"] == 0)
                or ((w.get("head_draws", 0) or w.get("head_select", "fixed") != "fixed" or w.get("scan_count"))
                    and (w["tasks"] == 0 or w.get("heads") != "refit"))
                or (w.get("count_weight", 1) != 1 and not w.get("scan_count"))):
            continue  # nothing to retrieve by / the same vector as a recipe already scored
        again = {key: w.get(f"rerank_{key}") for key in ("size", "position")}
        if (any(v is not None and w[key] == 0 for key, v in again.items())
                or (w.get("rerank", 0) == 0 and any(v != grid[f"rerank_{key}"][0] for key, v in again.items()
                                                     if f"rerank_{key}" in grid))
                or (w.get("rerank", 0) > 0 and all(v in (None, w[key]) for key, v in again.items()))):
            continue  # no such part to weigh again / the same search as a recipe already scored
        try:
            cfg = RetrievalConfig(standardize=True, **w)
        except TypeError as e:
            raise InputError(f"recipe grid: {e}") from None
        stats = stats_of[cfg.position_frame, cfg.size_source, cfg.head_draws, cfg.head_select, cfg.scan_count,
                         cfg.count_weight]
        x = compose(parts, cfg, schema, stats)
        rerank = recipe_rerank(cfg, ev.meta, x.shape[1], str(embeddings))
        db = ev.train.with_x(x[ev.train_rows])
        row = {"recipe": w, "learned": knn_scores(db, ev.test.with_x(x[ev.test_rows]), [k], ev.tasks,
                                                  rerank=rerank)[k],
               "handcrafted": hand}
        row["score"] = recipe_score(row["learned"])
        if distorted:
            runs = [knn_scores(db, q.with_x(compose(p, cfg, schema, stats)), [k], ev.tasks, rerank=rerank)[k]
                    for q, p in distorted]
            row["distorted"] = {key: float(np.mean([r[key] for r in runs])) for key in runs[0]}
            row["score"] = (row["score"] + recipe_score(row["distorted"])) / 2
        rows.append(row)
    return sorted(rows, key=lambda r: -r["score"])


def combine_grids(paths) -> tuple[list[str], list[dict]]:
    """recipe_grid outputs (JSON) of several trainings -> (their names, rows best first): every recipe
    scored in all of them, with its score per training and their mean (how a recipe is chosen: the
    best mean over trainings, so that it does not hang on one training's luck)."""
    if len(paths) < 1:
        raise InputError("--grids: expected at least one recipe-grid JSON")
    names, scores, recipes = [], [], {}
    for p in paths:
        if not Path(p).is_file():
            raise InputError(f"{p}: recipe grid not found (written by `ray_job.py recipe-grid --out`)")
        try:
            rows = json.loads(Path(p).read_text())
        except json.JSONDecodeError as e:
            raise InputError(f"{p}: not a recipe-grid JSON ({e})") from None
        if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) and "recipe" in r and "score" in r
                                                             for r in rows):
            raise InputError(f"{p}: not a recipe-grid JSON (a list of rows with recipe and score)")
        names.append(Path(p).stem)
        scores.append({json.dumps(r["recipe"], sort_keys=True): float(r["score"]) for r in rows})
        recipes |= {json.dumps(r["recipe"], sort_keys=True): r["recipe"] for r in rows if not recipes}
    common = set.intersection(*(set(s) for s in scores))
    if not common:
        raise InputError(f"--grids: no recipe is scored in all of {', '.join(map(str, paths))}")
    out = [{"recipe": recipes.get(k) or json.loads(k), "scores": [s[k] for s in scores],
            "mean": float(np.mean([s[k] for s in scores]))} for k in common]
    return names, sorted(out, key=lambda r: (-r["mean"], json.dumps(r["recipe"], sort_keys=True)))


def format_combined(names: list[str], rows: list[dict], *, top: int = 10) -> str:
    weights = list(rows[0]["recipe"])
    lines = ["| " + " | ".join([*weights, "mean", *names]) + " |", "|" + "---|" * (len(weights) + 1 + len(names))]
    for r in rows[:top]:
        lines.append("| " + " | ".join([*(str(r["recipe"][w]) for w in weights), f"{r['mean']:.3f}",
                                        *(f"{s:.3f}" for s in r["scores"])]) + " |")
    return "\n".join(lines)


def format_grid(rows: list[dict], *, top: int = 10) -> str:
    """The best `top` recipes of recipe_grid as a Markdown table, with the handcrafted row last (and,
    when the grid scored distorted boxes, their mean accuracy and size RMSE)."""
    keys = [f"acc_{t}" for t in TASK_SCORE] + ["rmse_size_mm"]
    weights = list(rows[0]["recipe"])
    robust = "distorted" in rows[0]
    extra = ["distorted: mean acc", "distorted: size RMSE"] if robust else []
    lines = ["| " + " | ".join([*weights, "score", *keys, *extra]) + " |",
             "|" + "---|" * (len(weights) + 1 + len(keys) + len(extra))]
    for r in rows[:top]:
        cells = [str(r["recipe"][w]) for w in weights] + [f"{r['score']:.3f}"]
        cells += [fmt_metric(r["learned"][k], k) for k in keys]
        if robust:
            d = r["distorted"]
            cells += [f"{np.mean([d[f'acc_{t}'] for t in TASK_SCORE]):.3f}",
                      fmt_metric(d["rmse_size_mm"], "rmse_size_mm")]
        lines.append("| " + " | ".join(cells) + " |")
    hand = rows[0]["handcrafted"]
    lines.append("| handcrafted |" + " |" * len(weights) + " | "
                 + " | ".join(fmt_metric(hand[k], k) for k in keys) + " |" + " |" * len(extra))
    return "\n".join(lines)
