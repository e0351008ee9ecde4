"""retune: a model file's retrieval recipe changed without training (search-time keys keep the
archive; with the training manifest any key, its statistics and refit heads fit again)."""

import numpy as np
import pytest

from conftest import SECRET
from tumornet.errors import InputError
from tumornet.keys import keyed_id
from tumornet.manifest import read_manifest


def test_retune_changes_search_time_keys_only_and_the_archive_stays_valid(archive, small_cohort, tmp_path, capsys):
    from ray_job import main
    from retrieval.search import search_archived
    from tumornet.descriptor import recipe_of
    from tumornet.export import load_model, with_search_settings

    model, emb, out = archive / "model.pt", archive / "emb", tmp_path / "retuned.pt"
    mid = with_search_settings(model, out, ["retrieval.rerank=3", "retrieval.refine_box=true"])
    _, meta = load_model(out)
    cfg = recipe_of(meta)[0]
    assert mid == meta["model_id"] == load_model(model)[1]["model_id"] and cfg.rerank == 3 and cfg.refine_box
    assert recipe_of(meta)[1] == recipe_of(load_model(model)[1])[1]  # the statistics are the same
    key = read_manifest(small_cohort).rows[0]
    tumor = f"{keyed_id(key.scan_id, SECRET)}:{key.tumor_id}"
    (a,) = search_archived(out, emb, tumor, k=5)  # the same shards, no new embedding
    (b,) = search_archived(model, emb, tumor, k=5, rerank=3)
    assert [h["scan_key"] for h in a["hits"]] == [h["scan_key"] for h in b["hits"]]
    with pytest.raises(InputError, match=r"only the search-time keys .* give the training manifest"):
        with_search_settings(model, tmp_path / "x.pt", ["retrieval.size=2"])
    with pytest.raises(InputError, match=r"retrieval\.rerank: expected a whole number >= 0"):
        with_search_settings(model, tmp_path / "x.pt", ["retrieval.rerank=-1"])
    with pytest.raises(InputError, match="give at least one --set"):
        with_search_settings(model, tmp_path / "x.pt", [])
    assert not (tmp_path / "x.pt").exists()
    assert main(["retune", "--model", str(model), "--out", str(tmp_path / "y.pt"), "--set", "retrieval.rerank=0"]) == 0
    assert f"model {mid}" in capsys.readouterr().out


def test_retune_with_the_manifest_fits_a_new_recipe_without_training(archive, small_cohort, tmp_path, capsys):
    """retune --manifest: any retrieval key, the recipe's statistics and refit heads fit again on the
    model's training scans (its recorded split): the same weights and model id, the new recipe's
    statistics (as many tumors as the training scans hold), the same result twice; a key outside
    `retrieval` is refused."""
    from ray_job import main
    from trainer.loop import with_recipe
    from tumornet.descriptor import compose, recipe_of
    from tumornet.export import load_model
    from tumornet.split import split_of_model

    model, out = archive / "model.pt", tmp_path / "recipe.pt"
    recipe = ["retrieval.roipool=0.5", "retrieval.standardize=true", "retrieval.tasks=1", "retrieval.heads=refit",
              "retrieval.size=1", "retrieval.position=1", "retrieval.head_select=cv"]
    mid = with_recipe(model, out, recipe, small_cohort)
    _, before = load_model(model)
    new, meta = load_model(out)
    cfg, stats = recipe_of(meta)
    assert mid == meta["model_id"] == before["model_id"] and recipe_of(before)[1] is None
    assert (cfg.tasks, cfg.heads, cfg.head_select, cfg.size) == (1.0, "refit", "cv", 1.0)
    cohort = read_manifest(small_cohort)
    train_ids = split_of_model(cohort, meta, where="m")[0]
    assert stats["tumors"] == sum(len(cohort.scans()[s]) for s in train_ids) and stats["heads"]["select"] == "cv"
    parts = {"roipool": np.zeros((2, 8)), "task_logits": np.zeros((2, 20)), "box_log_volume": np.zeros(2),
             "position": np.zeros((2, 3))}
    assert compose(parts, cfg, new.schema, stats).shape == (2, 8 + 20 + 1 + 3)
    with_recipe(model, tmp_path / "again.pt", recipe, small_cohort)
    assert recipe_of(load_model(tmp_path / "again.pt")[1])[1] == stats  # fit on the same scans, the same way
    with pytest.raises(InputError, match=r"only retrieval\.KEY can change .* train again"):
        with_recipe(model, tmp_path / "x.pt", ["train.epochs=3"], small_cohort)
    with pytest.raises(InputError, match=r"'retrieval\.sizee=1': unknown retrieval key \(expected one of .*size,"):
        with_recipe(model, tmp_path / "x.pt", ["retrieval.sizee=1"], small_cohort)
    assert not (tmp_path / "x.pt").exists()
    assert main(["retune", "--model", str(out), "--out", str(tmp_path / "y.pt"), "--set", "retrieval.head_select=fixed",
                 "--manifest", str(small_cohort)]) == 0
    assert f"model {mid}" in capsys.readouterr().out and recipe_of(load_model(tmp_path / "y.pt")[1])[1]["heads"][
        "select"] == "fixed"
    # a recipe that reads the scan's tumor count also gets heads without it (for tumors of an unknown count)
    assert "heads_uncounted" not in stats
    with_recipe(out, tmp_path / "count.pt", ["retrieval.scan_count=true", "retrieval.count_weight=10"], small_cohort)
    counted = recipe_of(load_model(tmp_path / "count.pt")[1])[1]
    assert (counted["heads"]["scan_count"], counted["heads"]["count_weight"]) == (True, 10.0)
    assert (counted["heads_uncounted"]["scan_count"], counted["heads_uncounted"]["select"]) == (False, "cv")
    uncounted = [counted["heads_uncounted"][t] for t in new.schema.names]
    assert all("scan_log_tumors" not in h["inputs"] for h in uncounted)
