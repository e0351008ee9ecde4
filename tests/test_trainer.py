"""Ray Train + DeepSpeed on CPU, against a real local Ray head (marked ray + slow)."""

import json
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from conftest import DASHBOARD_PORT
from tumornet.config import load_config
from tumornet.export import load_model
from tumornet.manifest import read_manifest
from tumornet.split import split_of_model

pytestmark = [pytest.mark.ray, pytest.mark.slow]
ROOT = Path(__file__).resolve().parent.parent
def _config(tmp_path, small_cohort, name, **train):
    raw = {
        "name": name,
        "data": {"manifest": str(small_cohort), "spacing_mm": 4.0},
        "model": {"channels": 8, "blocks": 1},
        "train": {"epochs": 3, "batches_per_epoch": 3, "batch_size": 2, "patch_size": 16, "lr": 0.05,
                  "milestones": [100], "cache_dir": str(tmp_path / "cache"), **train},
        "distributed": {"workers": 2, "cpus_per_worker": 1, "storage_path": str(tmp_path / "runs"),
                        "max_failures": 2},
    }
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


def _train(path, *overrides):
    from trainer.launch import run_training

    cfg = load_config(path, list(overrides))
    return run_training(cfg, manifest=cfg.data.manifest)


def _records(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def test_two_workers_train_loss_falls_and_model_exports(ray_head, tmp_path, small_cohort):
    # export registers scans, and refits the heads with inputs chosen by cross-validation over patients
    s = _train(_config(tmp_path, small_cohort, "a"), "retrieval.position_frame=atlas", "retrieval.head_select=cv")
    recs = _records(s["run_dir"])
    assert [r["step"] for r in recs] == [3, 6, 9]
    assert recs[-1]["train/loss"] < recs[0]["train/loss"]
    assert 0 <= recs[-1]["data_wait_share"] < 1 and recs[-1]["samples_per_s"] > 0
    assert recs[-1]["malloc_arena_max"] == 1  # the allocator settings reached the worker processes
    assert {"val/dice", "val/loss", "val/acc_tumor_type"} <= set(recs[-1])
    assert any((Path(s["run_dir"]) / "tensorboard").iterdir())
    model, meta = load_model(s["model"])  # weights_only=True inside
    state = json.loads((Path(s["checkpoint"]) / "trainer_state.json").read_text())
    assert state["step"] == 9 and meta["model_id"] == state["model_id"]
    assert state["config"]["model"]["channels"] == 8 and state["tasks"]["tumor_type"][0] == "metastasis"
    assert model.embed(torch.randn(16, 16, 16), [[2, 2, 2, 8, 8, 8]]).shape == (1, 8)
    # the retrieval statistics and refit heads, from every training scan (not one worker's half)
    stats, cohort = meta["extra"]["retrieval_stats"], read_manifest(small_cohort)
    n_train = sum(len(cohort.scans()[sid]) for sid in split_of_model(cohort, meta, where="t")[0])
    frame = state["config"]["retrieval"]["position_frame"]
    assert stats["tumors"] == n_train and set(stats["heads"]) == {*model.schema.names, "position_frame", "size_source",
                                                                   "select", "scan_count", "count_weight"}
    assert stats["heads"]["scan_count"] is False and stats["heads"]["count_weight"] == 1.0  # the run reads no count
    assert stats["heads"]["size_source"] == "box" and len(stats["size_fit"]["coef"]) == 1 + 1 + 8  # fit_size
    assert stats["heads"]["position_frame"] == frame == "atlas"  # the heads fit for the run's recipe
    # each head reads what cross-validation chose of the RoiPool, the template position, size, and what the
    # atlas says of the box
    width = {"roipool": 8, "template_position": 3, "box_log_volume": 1, "atlas": 13}
    assert stats["heads"]["select"] == "cv"
    for t in model.schema.names:
        head = stats["heads"][t]
        assert set(head["inputs"]) <= set(width) and "template_position" in head["inputs"]
        assert all(len(row) == sum(width[k] for k in head["inputs"]) for row in head["coef"])
    assert len(stats["atlas"]["mean"]) == 13 and len(stats["template_position"]["mean"]) == 3


def test_resume_gives_identical_weights(ray_head, tmp_path, small_cohort):
    cont = _train(_config(tmp_path, small_cohort, "cont"))
    cfg = _config(tmp_path, small_cohort, "part")
    first = _train(cfg, "train.epochs=2")
    assert [r["step"] for r in _records(first["run_dir"])] == [3, 6]
    resumed = _train(cfg)  # same run name: resumes from step 6 instead of starting over
    assert [r["step"] for r in _records(resumed["run_dir"])] == [3, 6, 9]
    a, _ = load_model(cont["model"])
    b, _ = load_model(resumed["model"])
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.allclose(va.float(), vb.float(), atol=1e-6), k


def test_zero2_with_a_killed_worker_finishes_all_steps(ray_head, tmp_path, small_cohort):
    s = _train(_config(tmp_path, small_cohort, "ft", fail_at_step=5), "distributed.zero_stage=2")
    run = Path(s["run_dir"])
    assert (run / ".injected_failure").read_text().startswith("worker 1 killed after step 5")
    assert [r["step"] for r in _records(run)] == [3, 6, 9]  # resumed from step 3, no step lost or repeated
    assert json.loads((Path(s["checkpoint"]) / "trainer_state.json").read_text())["step"] == 9


def test_ray_job_submit(ray_head, tmp_path, small_cohort):
    cfg = _config(tmp_path, small_cohort, "job", epochs=1, batches_per_epoch=2)
    runtime_env = json.dumps({"excludes": [".venv", ".git", "outputs", "runs", "__pycache__", ".pytest_cache"]})
    r = subprocess.run(
        [ray_head["RAY"], "job", "submit", "--address", f"http://127.0.0.1:{DASHBOARD_PORT}",
         "--working-dir", str(ROOT), "--runtime-env-json", runtime_env,
         "--", "python", "ray_job.py", "train", "--config", str(cfg), "--set", "loss.metric=0.01"],
        env=ray_head, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "succeeded" in r.stdout + r.stderr
    assert (tmp_path / "runs" / "job" / "model.pt").is_file()
    (rec,) = _records(tmp_path / "runs" / "job")
    assert rec["train/metric"] > 0  # the metric term ran in the workers, contrasting with their memory


def test_experiment_trains_embeds_and_scores_each_variant(ray_head, tmp_path, small_cohort):
    from retrieval.experiments import format_experiment, read_experiment, run_experiment

    cfg = load_config(_config(tmp_path, small_cohort, "ex", epochs=1, batches_per_epoch=2),
                      ["distributed.workers=1"])
    key = tmp_path / "site.key"
    key.write_text("0123456789abcdef0123")
    variants = {"c4": {"model": {"channels": 4}}, "seg_only": {"loss": {"task": 0.0}}}
    exp = run_experiment("Test table", cfg, variants, manifest=small_cohort, secret_file=key, out_dir=tmp_path / "x",
                         k=3, log=lambda *_: None)
    assert [r["variant"] for r in exp["rows"]] == ["c4", "seg_only"]
    for r in exp["rows"]:
        assert r["steps"] == 2 and r["wall_s"] > 0 and r["split"]["test_fraction"] == 0.2
        assert 0 <= r["learned"]["acc_tumor_type"] <= 1 and r["handcrafted"]["rmse_size_mm"] > 0
        _, meta = load_model(tmp_path / "x" / "runs" / f"ex-{r['variant']}" / "model.pt")
        assert meta["model_id"] == r["model_id"]
    written = json.loads((tmp_path / "x" / "c4" / "config.json").read_text())
    assert written["model"]["channels"] == 4 and written["loss"]["task"] == 0.001
    assert json.loads((tmp_path / "x" / "seg_only" / "config.json").read_text())["loss"]["task"] == 0.0
    assert read_experiment(tmp_path / "x" / "test-table.json") == json.loads(json.dumps(exp))
    assert "| c4 | learned |" in format_experiment(exp)
