"""Recipe grids (retrieval.experiments): a recipe scored on the validation split from the shards' parts,
grid files read and checked, and the grids of several trainings averaged."""

import json
from dataclasses import replace

import numpy as np
import pytest
from test_descriptor import RECIPE, _keeps_older_fingerprints, _model, _parts

from conftest import SECRET
from embedder.embed import embed_scan
from tumornet.descriptor import compose
from tumornet.errors import InputError
from tumornet.fitted import fit_stats
from tumornet.labels import DEFAULT_SCHEMA
from tumornet.manifest import read_manifest
from tumornet.recipe import RetrievalConfig


def test_a_recipe_scored_on_validation_from_the_shards_parts(small_cohort, tmp_path):
    """evaluate(retrieval=...) recomposes the vectors from the stored parts with the model's
    statistics, and on="validation" searches the validation patients among the training ones."""
    from embedder.shards import model_shard_schema, write_shard
    from retrieval.evaluate import evaluate, format_evaluation, load_evaluation
    from retrieval.experiments import recipe_grid, recipe_score
    from retrieval.robustness import robustness
    from tumornet.export import export_model
    from tumornet.split import patient_sides, record_split

    model = _model()
    cohort = read_manifest(small_cohort)
    split = record_split(cohort, test_fraction=0.2, seed=0, validation_fraction=0.3)
    stats = fit_stats(_parts(small_cohort, model))
    path = tmp_path / "model.pt"
    mid = export_model(model, path, extra={"spacing_mm": [4.0] * 3, "patch_size": 16, "split": split,
                                           "retrieval_stats": stats, "steps": 0})
    rows = [r for scan in cohort.scans().values()
            for r in embed_scan(model, mid, scan, spacing_mm=4.0, patch_size=16, secret=SECRET)]
    write_shard(rows, tmp_path / "emb" / "s.parquet", model_shard_schema(model, RetrievalConfig()))
    ev = load_evaluation(tmp_path / "emb", small_cohort, SECRET, path, on="validation", retrieval=RECIPE)
    sides = patient_sides(cohort, test_fraction=0.2, seed=0, validation_fraction=0.3)
    n_val = sum(1 for r in cohort.rows if r.patient_id in set(sides["validation"]))
    n_train = sum(1 for r in cohort.rows if r.patient_id in set(sides["train"]))
    assert (len(ev.test.x), len(ev.train.x)) == (n_val, n_train)
    first = ev.table.slice(int(ev.test_rows[0]), 1).to_pylist()[0]
    parts = {"roipool": np.array([first["roipool"]]), "task_logits": np.array([first["task_logits"]]),
             "box_log_volume": np.array([first["box_log_volume"]]), "position": np.array([first["position"]])}
    assert np.allclose(ev.test.x[0], compose(parts, RECIPE, DEFAULT_SCHEMA, stats)[0], atol=1e-5)
    res = evaluate(tmp_path / "emb", small_cohort, SECRET, path, k=3, ks=[3], on="validation", retrieval=RECIPE)
    assert res["on"] == "validation" and res["test_tumors"] == n_val and res["rerank"] == 0
    # a two-stage search of the same vectors; evaluate --rerank 0 scores it in one stage again
    two = replace(RECIPE, rerank=4, rerank_size=3.0)
    staged = evaluate(tmp_path / "emb", small_cohort, SECRET, path, k=3, ks=[3], on="validation", retrieval=two)
    assert staged["rerank"] == 4 and "the 4 nearest re-ordered" in format_evaluation(staged)
    assert staged["rows"]["learned"] != res["rows"]["learned"]
    assert evaluate(tmp_path / "emb", small_cohort, SECRET, path, k=3, ks=[3], on="validation", retrieval=two,
                    rerank=0)["rows"] == res["rows"]
    grid = recipe_grid(path, tmp_path / "emb", small_cohort, SECRET, k=3,
                       grid={"roipool": (0.0, 1.0), "tasks": (0.0,), "size": (1.0,), "position": (1.0, 2.0)})
    assert len(grid) == 2 and grid[0]["score"] >= grid[1]["score"]  # roipool 0 with tasks 0 is skipped
    with pytest.raises(InputError, match=r"shards without atlas, template_position \(written by an older version, "
                                         r"or by a recipe that reads no position\): embed again"):
        recipe_grid(path, tmp_path / "emb", small_cohort, SECRET, k=3,  # the paper's recipe stores no template frame
                    grid={"roipool": (1.0,), "tasks": (0.0,), "size": (1.0,), "position": (1.0,),
                          "position_frame": ("head", "atlas")})
    heads = recipe_grid(path, tmp_path / "emb", small_cohort, SECRET, k=3,
                        grid={"roipool": (1.0,), "tasks": (0.0, 1.0), "size": (1.0,), "position": (1.0,),
                              "heads": ("network", "refit")})  # refit heads fit on the shards' training rows
    assert sorted((r["recipe"]["tasks"], r["recipe"]["heads"]) for r in heads) == [
        (0.0, "network"), (1.0, "network"), (1.0, "refit")]  # refit without a tasks part: the same vector
    pooled = recipe_grid(path, tmp_path / "emb", small_cohort, SECRET, k=3,
                         grid={"roipool": (0.0, 1.0), "whiten": (False, True), "tasks": (0.0,), "size": (1.0,),
                               "position": (1.0,), "roimean": (0.0, 1.0), "context": (0.0, 1.0)})
    # of 16: roipool 0 whitened = not whitened (4 skipped); nothing pooled and no tasks (1 skipped)
    assert len(pooled) == 11 and len({json.dumps(r["recipe"], sort_keys=True) for r in pooled}) == 11
    robust = recipe_grid(path, tmp_path / "emb", small_cohort, SECRET, k=3, draws=1,
                         grid={"roipool": (1.0,), "tasks": (0.0,), "size": (1.0,), "position": (1.0,)})
    (row,) = robust
    assert row["score"] == pytest.approx((recipe_score(row["learned"]) + recipe_score(row["distorted"])) / 2)
    rough = recipe_grid(path, tmp_path / "emb", small_cohort, SECRET, k=3,
                        grid={"roipool": (1.0,), "tasks": (0.0, 1.0), "size": (1.0,), "position": (1.0,),
                              "heads": ("refit",), "head_draws": (0, 2)})  # tasks 0: no heads to fit (skipped)
    assert sorted(r["recipe"]["head_draws"] for r in rough) == [0, 2]
    counted = recipe_grid(path, tmp_path / "emb", small_cohort, SECRET, k=3,
                          grid={"roipool": (0.0,), "tasks": (1.0,), "size": (1.0,), "position": (1.0,),
                                "heads": ("network", "refit"), "scan_count": (False, True)})
    # heads with and without the scan's tumor count, each its own row; the network's heads read no count
    assert sorted((r["recipe"]["heads"], r["recipe"]["scan_count"]) for r in counted) == [
        ("network", False), ("refit", False), ("refit", True)]
    two = recipe_grid(path, tmp_path / "emb", small_cohort, SECRET, k=3,
                      grid={"roipool": (1.0,), "tasks": (0.0,), "size": (0.0, 1.0), "position": (1.0,),
                            "rerank": (0, 4), "rerank_size": (None, 3.0)})
    # one stage once per vector; with no size part there is nothing to weigh again: skipped
    assert sorted((r["recipe"]["size"], r["recipe"]["rerank"], r["recipe"]["rerank_size"] or 0) for r in two) == [
        (0.0, 0, 0), (1.0, 0, 0), (1.0, 4, 3.0)]
    rob = robustness(path, tmp_path / "emb", small_cohort, SECRET, k=3, draws=1, on="validation")
    assert rob["on"] == "validation" and rob["test_tumors"] == n_val
    # another recipe: the distorted queries are recomposed with it too (undistorted: the clean scores)
    same = robustness(path, tmp_path / "emb", small_cohort, SECRET, k=3, draws=1, on="validation", retrieval=RECIPE,
                      log2_scale_sd=0.0, shift_sd=0.0)
    assert same["clean"] == res["rows"]["learned"] != rob["clean"]
    assert same["distorted_mean"] == pytest.approx(same["clean"], nan_ok=True)


def test_a_grid_file_names_known_keys_and_lists(tmp_path):
    from retrieval.experiments import GRID, read_grid

    good = tmp_path / "g.yaml"
    good.write_text("roimean: [0, 0.5]\nwhiten: [false, true]\n")
    grid = read_grid(good)
    assert grid["roimean"] == (0, 0.5) and grid["whiten"] == (False, True) and grid["tasks"] == GRID["tasks"]
    assert read_grid("grid-pooling")["context"] == (0, 0.5, 1)  # the bundled fourth round
    assert read_grid("grid-roipool")["heads"] == ("network",) and read_grid("grid-roipool")["size"] == (0,)
    assert read_grid("grid-frame")["position_frame"] == ("head", "template", "atlas")  # the bundled sixth round
    assert read_grid("grid-rerank")["rerank_size"] == (None, 2, 4, 8)  # the bundled ninth round
    for text, match in (("pooling: [1]\n", "unknown grid key 'pooling'"), ("roimean: 0.5\n", "roimean: expected a "
                        "non-empty list"), ("standardize: [true]\n", "unknown grid key 'standardize'"),
                        ("roimean: [0, x]\n", "roimean: expected a weight >= 0, got 'x'"),
                        ("whiten: [1]\n", "whiten: expected true or false, got 1"),
                        ("heads: [mlp]\n", "heads: expected network or refit, got 'mlp'"),
                        ("position_frame: [mni]\n", "position_frame: expected head, template or atlas, got 'mni'"),
                        ("rerank: [2.5]\n", "rerank: expected a whole number >= 0, got 2.5"),
                        ("rerank_size: [-1]\n", "rerank_size: expected a weight >= 0 or null, got -1")):
        good.write_text(text)
        with pytest.raises(InputError, match=match):
            read_grid(good)


def test_recipe_grids_of_several_trainings_are_averaged(tmp_path):
    from retrieval.experiments import combine_grids, format_combined

    a = [{"recipe": {"roipool": 1.0, "size": 1.0}, "score": 0.80},
         {"recipe": {"roipool": 0.5, "size": 1.0}, "score": 0.70},
         {"recipe": {"roipool": 0.0, "size": 1.0}, "score": 0.99}]  # only in a: left out
    b = [{"recipe": {"size": 1.0, "roipool": 0.5}, "score": 0.90},
         {"recipe": {"roipool": 1.0, "size": 1.0}, "score": 0.76}]
    (tmp_path / "a.json").write_text(json.dumps(a))
    (tmp_path / "b.json").write_text(json.dumps(b))
    names, rows = combine_grids([tmp_path / "a.json", tmp_path / "b.json"])
    assert names == ["a", "b"]
    assert [(r["recipe"]["roipool"], r["scores"]) for r in rows] == [(0.5, [0.70, 0.90]), (1.0, [0.80, 0.76])]
    assert rows[0]["mean"] == pytest.approx(0.80) and rows[1]["mean"] == pytest.approx(0.78)
    assert format_combined(names, rows).splitlines()[2] == "| 0.5 | 1.0 | 0.800 | 0.700 | 0.900 |"
    (tmp_path / "c.json").write_text(json.dumps({"rows": []}))
    with pytest.raises(InputError, match=r"c\.json: not a recipe-grid JSON"):
        combine_grids([tmp_path / "a.json", tmp_path / "c.json"])
    (tmp_path / "d.json").write_text(json.dumps([{"recipe": {"roipool": 2.0}, "score": 0.5}]))
    with pytest.raises(InputError, match="no recipe is scored in all of"):
        combine_grids([tmp_path / "a.json", tmp_path / "d.json"])


def _grid_takes(tmp_path, key: str, good: str, bad: str, error: str) -> tuple:
    """A recipe grid with `key: good` (YAML list) is read (-> its values); with `key: bad` it is refused
    with `error`."""
    from retrieval.experiments import read_grid

    g = tmp_path / "g.yaml"
    g.write_text(f"{key}: {bad}\n")
    with pytest.raises(InputError, match=error):
        read_grid(g)
    g.write_text(f"{key}: {good}\n")
    return read_grid(g)[key]


def test_size_units_in_a_grid_and_the_fingerprint_of_older_archives(tmp_path):
    """A grid may try both size units; the default units leave the embedding fingerprint of an archive
    embedded before they existed unchanged (the value the previous version computed), mm changes it."""
    assert _grid_takes(tmp_path, "size_units", "[log, mm]", "[inch]",
                       "size_units: expected log or mm, got 'inch'") == ("log", "mm")
    assert _grid_takes(tmp_path, "task_temperature", "[1, 0.5]", "[0.5, 0]",
                       "task_temperature: expected a number > 0, got 0") == (1, 0.5)
    _keeps_older_fingerprints("size_units", "log", "mm")
