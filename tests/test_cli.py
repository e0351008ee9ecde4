import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ray_job import main

ROOT = Path(__file__).resolve().parent.parent


def test_summary_of_a_phantom_cohort(small_cohort, capsys):
    assert main(["summary", str(small_cohort), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["tumors"] == sum(1 for _ in open(small_cohort)) - 1
    assert s["split"]["train_patients"] + s["split"]["test_patients"] == s["patients"] == 24
    assert set(s["size_mm"]) <= {"metastasis", "meningioma", "schwannoma", "unlabelled"}


def test_summary_never_prints_patient_ids(small_cohort, capsys):
    assert main(["summary", str(small_cohort)]) == 0
    assert "SYN003-" not in capsys.readouterr().out


def test_bad_input_exits_2_with_one_clear_line(tmp_path, capsys):
    (tmp_path / "m.csv").write_text("patient_id,scan_id\nP,S\n")
    assert main(["summary", str(tmp_path / "m.csv")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "m.csv: missing column(s)" in err


def test_phantom_subcommand_as_a_process(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "ray_job.py"), "phantom", "--out", str(tmp_path / "c"),
                        "--patients", "2", "--spacing", "4", "--workers", "1"],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "c" / "manifest.csv").is_file() and (tmp_path / "c" / "cohort.json").is_file()
    meta = json.loads((tmp_path / "c" / "cohort.json").read_text())
    assert meta["config"]["patients"] == 2 and meta["config"]["voxel_mm"] == 4.0


def test_installed_command_works_from_another_folder(tmp_path, small_cohort):
    """The console script finds its bundled config (the default `demo`) outside the repository."""
    exe = Path(sys.executable).parent / "tumor-retrieval"
    if not exe.is_file():
        pytest.skip("the tumor-retrieval console script is not installed in this environment")
    r = subprocess.run([str(exe), "summary", str(small_cohort), "--fast", "--json"], capture_output=True, text=True,
                       cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["patients"] == 24
    r = subprocess.run([str(exe), "summary", str(small_cohort), "--config", "paper", "--fast"], capture_output=True,
                       text=True, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([str(exe), "summary", str(small_cohort), "--config", "nope"], capture_output=True, text=True,
                       cwd=tmp_path, timeout=300)
    assert r.returncode == 2
    assert ("nope: config file not found (bundled configs: ['ablation', 'demo', 'grid-cohorts', 'grid-context', "
            "'grid-count', 'grid-countweight', 'grid-dice', 'grid-frame', 'grid-heads', 'grid-labelsize', "
            "'grid-pooling', 'grid-rerank', 'grid-robust', 'grid-roipool', 'grid-rough', 'grid-shipped', "
            "'grid-size', 'grid-sizefit', 'grid-temperature', 'grid-warp', 'paper', 'recipes', 'site', "
            "'site-gpu']") in r.stderr


@pytest.mark.ray
@pytest.mark.slow
def test_train_as_a_plain_local_run_starts_ray_itself(tmp_path, small_cohort):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({
        "name": "local", "data": {"manifest": str(small_cohort), "spacing_mm": 4.0},
        "model": {"channels": 4, "blocks": 1},
        "train": {"epochs": 1, "batches_per_epoch": 2, "patch_size": 16, "cache_dir": str(tmp_path / "cache")},
        "distributed": {"workers": 1, "storage_path": str(tmp_path / "runs")}}))
    # as a user runs it: no cluster to join, Ray's authentication mode left to Ray (token, on)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    r = subprocess.run([sys.executable, str(ROOT / "ray_job.py"), "train", "--config", str(cfg)],
                       capture_output=True, text=True, cwd=tmp_path, timeout=600, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    out = json.loads((tmp_path / "runs" / "local" / "result.json").read_text())
    assert out["run"] == "local" and Path(out["model"]).is_file() and out["metrics"]["step"] == 2
    # it ran with no cluster to join, so it started its own; the console reads like a tool's: Ray's
    # INFO lines stay in its log folder, one line per epoch, no report dicts
    console = r.stderr + r.stdout
    assert "Started a local Ray instance" not in console and "Reporting training result" not in console
    assert "Token authentication is enabled" not in console and "PreemptionWatcher" not in console
    assert sum(line.startswith("epoch   1 |") for line in console.splitlines()) == 1


def test_new_readers_name_the_bad_file(tmp_path, capsys):
    from retrieval.evaluate import read_evaluation
    from retrieval.experiments import read_experiment, read_variants
    from tumornet.errors import InputError
    from tumornet.keys import ensure_secret, read_secret

    with pytest.raises(InputError, match=r"gone\.json: evaluation not found \(written by `ray_job.py evaluate"):
        read_evaluation(tmp_path / "gone.json")
    (tmp_path / "e.json").write_text("{not json")
    with pytest.raises(InputError, match=r"e\.json: not an evaluation \(Expecting"):
        read_evaluation(tmp_path / "e.json")
    (tmp_path / "e2.json").write_text('{"rows": {}}')
    with pytest.raises(InputError, match=r"e2\.json: not an evaluation \(expected keys"):
        read_evaluation(tmp_path / "e2.json")
    with pytest.raises(InputError, match=r"e2\.json: not an experiment table"):
        read_experiment(tmp_path / "e2.json")
    (tmp_path / "v.yaml").write_text("a: [1, 2]\n")
    with pytest.raises(InputError, match=r"v\.yaml: a: expected a mapping section"):
        read_variants(tmp_path / "v.yaml")
    key = ensure_secret(tmp_path / "k" / "site.key")
    assert len(read_secret(key)) == 64 and ensure_secret(key).read_text() == key.read_text()
    assert main(["search", "--model", "m.pt", "--embeddings", "e", "--image", "x.nii.gz", "--box", "1,2,3"]) == 2
    assert "--box: expected 6 comma-separated numbers" in capsys.readouterr().err
    # a box left of the origin: its value starts with "-", still the box (then the missing model is the error)
    for box in (["--box", "-20,10,5,-2,30,22"], ["--box=-20,10,5,-2,30,22"]):
        assert main(["search", "--model", "m.pt", "--embeddings", "e", "--image", "x.nii.gz", *box]) == 2
        assert "expected one argument" not in (err := capsys.readouterr().err) and "--box: expected" not in err
        assert "m.pt" in err
    with pytest.raises(SystemExit):  # no value before the next option: argparse's own message names --box
        main(["search", "--model", "m.pt", "--embeddings", "e", "--image", "x.nii.gz", "--box", "--k", "3"])
    assert "argument --box: expected one argument" in capsys.readouterr().err
    assert main(["evaluate", "--model", "m.pt", "--embeddings", "e", "--manifest", "x.csv", "--secret-file", "k",
                 "--detection", "--detect-thresholds", "0.3,high"]) == 2
    assert "--detect-thresholds: expected comma-separated numbers, got '0.3,high'" in capsys.readouterr().err
    assert main(["evaluate", "--model", "m.pt", "--embeddings", "e", "--manifest", "x.csv", "--secret-file", "k",
                 "--detection", "--detect-thresholds", "0.3,1.5"]) == 2
    assert "--detect-thresholds: each must be in (0, 1), got '0.3,1.5'" in capsys.readouterr().err
    assert main(["evaluate", "--model", "m.pt", "--embeddings", "e", "--manifest", "x.csv", "--secret-file", "k",
                 "--detector", "d.pt"]) == 2  # a detector is scored by --detection only
    assert "--detector scores the tumors a detector finds: give --detection with it" in capsys.readouterr().err
    assert main(["compact", "--embeddings", str(tmp_path)]) == 2
    assert "no embedding shards" in capsys.readouterr().err


def test_evaluate_recompose_scores_a_retuned_recipe_on_its_base_archive(archive, small_cohort, tmp_path):
    """evaluate --recompose: a model file from `retune --manifest` (the same weights and model id, another
    recipe) scored on the archive its base model embedded: the vectors recomposed from the stored parts
    with its own recipe (as evaluate(retrieval=...)), not the stored vectors of the base recipe."""
    from conftest import SECRET
    from retrieval.evaluate import evaluate, read_evaluation
    from trainer.loop import with_recipe
    from tumornet.descriptor import recipe_of
    from tumornet.export import load_model

    out = tmp_path / "recipe.pt"
    with_recipe(archive / "model.pt", out, ["retrieval.roipool=0.5", "retrieval.standardize=true",
                                            "retrieval.tasks=1", "retrieval.heads=refit", "retrieval.size=1",
                                            "retrieval.position=1"], small_cohort)
    (tmp_path / "key").write_bytes(SECRET)
    base = ["evaluate", "--model", str(out), "--embeddings", str(archive / "emb"), "--manifest", str(small_cohort),
            "--secret-file", str(tmp_path / "key"), "--ks", "5"]
    assert main([*base, "--recompose", "--out", str(tmp_path / "re.json")]) == 0
    assert main([*base, "--out", str(tmp_path / "stored.json")]) == 0
    recomposed = read_evaluation(tmp_path / "re.json")["rows"]["learned"]
    cfg = recipe_of(load_model(out)[1])[0]
    assert recomposed == evaluate(archive / "emb", small_cohort, SECRET, out, ks=[5], retrieval=cfg)["rows"]["learned"]
    assert recomposed != read_evaluation(tmp_path / "stored.json")["rows"]["learned"]
