from pathlib import Path

import pytest

from tumornet.config import load_config
from tumornet.errors import InputError
from tumornet.labels import DEFAULT_SCHEMA

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.mark.parametrize("name", ["demo.yaml", "paper.yaml", "site.yaml", "site-gpu.yaml"])
def test_shipped_configs_load(name):
    cfg = load_config(CONFIGS / name)
    assert cfg.tasks == DEFAULT_SCHEMA and cfg.phantom.patients > 0


def test_site_recipe_scaled_up_for_gpu_nodes_is_the_papers_training():
    """site-gpu = the paper's training with the site's retrieval recipe; paper keeps the paper's."""
    paper, site, gpu = (load_config(CONFIGS / f"{n}.yaml") for n in ("paper", "site", "site-gpu"))
    assert gpu.retrieval == site.retrieval and gpu.retrieval.heads == "refit"
    assert (gpu.train, gpu.model, gpu.loss, gpu.data, gpu.distributed) == (
        paper.train, paper.model, paper.loss, paper.data, paper.distributed)
    assert paper.retrieval.roipool == 1.0 and not paper.retrieval.standardize and paper.retrieval.tasks == 0.0


def test_site_config_trains_with_the_dice_term_the_paper_does_not():
    site, paper, demo = (load_config(CONFIGS / f"{n}.yaml") for n in ("site", "paper", "demo"))
    assert site.loss.seg_dice == 0.25 and site.loss.seg == 1.0 and site.loss.task == 0.01
    assert paper.loss.seg_dice == 0.0 and demo.loss.seg_dice == 0.0
    # the per-tumor Dice (twenty-ninth session): the site's recipe only, never the paper's
    assert site.loss.seg_dice_per_tumor == 0.25
    assert paper.loss.seg_dice_per_tumor == 0.0 and demo.loss.seg_dice_per_tumor == 0.0


@pytest.mark.parametrize("name", ["demo", "paper"])
def test_typed_config_round_trips_through_plain_types(name):
    import dataclasses
    import json

    from tumornet.config import config_from_dict, config_to_dict, with_overrides

    cfg = load_config(name, ["distributed.worker_env={A: x}", "loss.per_task={area: 0.01}"])
    plain = json.loads(json.dumps(config_to_dict(cfg)))  # what workers and the model file receive
    assert config_from_dict(plain) == cfg
    derived = with_overrides(cfg, model={"channels": 16}, train={"milestones": (3,)})
    back = config_from_dict(json.loads(json.dumps(config_to_dict(derived))))
    assert back.model.channels == 16 and back.train.milestones == (3,) and back == derived
    assert dataclasses.replace(cfg, name="x") != cfg
    with pytest.raises(InputError, match=r"model\.norm"):
        with_overrides(cfg, model={"norm": "layer"})
    with pytest.raises(InputError, match="modle: unknown config section"):
        with_overrides(cfg, modle={"channels": 1})


def test_overrides_apply_and_are_typed():
    cfg = load_config(CONFIGS / "demo.yaml", ["phantom.patients=7", "data.spacing_mm=[1.0, 1.0, 2.0]"])
    assert cfg.phantom.patients == 7 and cfg.data.spacing_mm == (1.0, 1.0, 2.0)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("phantom:\n  patinets: 3\n", r"c\.yaml: phantom\.patinets: unknown key"),
        ("phantom:\n  patients: many\n", r"phantom\.patients: expected int, got str 'many'"),
        ("trainer: {}\n", r"trainer: unknown key"),
        ("data:\n  test_fraction: 1.5\n", r"data\.test_fraction"),
        ("tasks:\n  tumor_type: [a]\n", r"task 'tumor_type': needs at least 2 classes"),
        ("a: [\n", "not valid YAML"),
        ("distributed:\n  worker_env: {NCCL_DEBUG: [INFO]}\n", r"worker_env\.NCCL_DEBUG: expected a string"),
        ("distributed:\n  worker_env: [NCCL_DEBUG]\n", r"worker_env: expected Mapping\[str, str\], got a list"),
        ("loss:\n  metric_temperature: 0\n", r"c\.yaml: loss\.metric_temperature: must be > 0, got 0$"),  # named once
    ],
)
def test_errors_name_file_and_key(tmp_path, text, match):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(InputError, match=match):
        load_config(p)


def test_bad_override_is_named():
    with pytest.raises(InputError, match=r"override 'phantom\.patients': expected key=value"):
        load_config(CONFIGS / "demo.yaml", ["phantom.patients"])


def test_sites_define_their_own_tasks(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("tasks:\n  tumor_type: [metastasis, meningioma, schwannoma, glioma]\n  grade: [low, high]\n")
    cfg = load_config(p)
    assert cfg.tasks.names == ("tumor_type", "grade") and cfg.tasks["tumor_type"].n_classes == 4


def test_paper_schedule_and_distributed_checks(tmp_path):
    cfg = load_config(CONFIGS / "paper.yaml")
    assert [round(cfg.train.lr_at(e), 6) for e in (0, 89, 90, 104, 105, 119)] == [0.1, 0.1, 0.01, 0.01, 0.001, 0.001]
    t = cfg.train
    assert (t.epochs, t.batches_per_epoch, t.batch_size, t.patch_size) == (120, 200, 2, 120)
    assert cfg.train.nesterov and cfg.loss.seg == 1.0 and cfg.loss.task == 1e-3 and cfg.data.test_fraction == 0.2
    with pytest.raises(InputError, match=r"distributed\.zero_stage: expected 0, 1 or 2"):
        load_config(CONFIGS / "demo.yaml", ["distributed.zero_stage=3"])
    with pytest.raises(InputError, match=r"distributed\.bf16: bf16 is for GPU runs only"):
        load_config(CONFIGS / "demo.yaml", ["distributed.bf16=true"])
    with pytest.raises(InputError, match=r"train\.patch_size"):
        load_config(CONFIGS / "demo.yaml", ["train.patch_size=4"])


def test_train_refuses_more_workers_than_training_scans(small_cohort):
    from trainer.launch import run_training

    cfg = load_config(CONFIGS / "demo.yaml", ["distributed.workers=500", "data.spacing_mm=4.0"])
    with pytest.raises(InputError, match=r"training scan\(s\) for 500 workers"):
        run_training(cfg, manifest=small_cohort)
    with pytest.raises(InputError, match="manifest not found"):
        run_training(cfg, manifest=small_cohort.parent / "none.csv")


def test_worker_env_reaches_the_trainer_after_the_allocator_settings(monkeypatch, small_cohort):
    import ray
    import ray.train.torch

    from trainer.launch import WORKER_LOGGING, run_training
    from tumornet.runtime import ALLOCATOR_ENV

    seen = {}

    class Stop(Exception):
        pass

    def fake_trainer(*args, run_config, **kwargs):
        seen.update(run_config.worker_runtime_env)
        raise Stop

    monkeypatch.setattr(ray.train.torch, "TorchTrainer", fake_trainer)
    monkeypatch.setattr(ray, "is_initialized", lambda: True)  # no Ray is started
    cfg = load_config(CONFIGS / "demo.yaml", ["distributed.workers=1", "data.spacing_mm=4.0",
                                               "distributed.worker_env={NCCL_DEBUG: INFO, MALLOC_ARENA_MAX: 4}"])
    assert cfg.distributed.worker_env == {"NCCL_DEBUG": "INFO", "MALLOC_ARENA_MAX": "4"}
    with pytest.raises(Stop):
        run_training(cfg, manifest=small_cohort)
    assert seen["env_vars"] == {**ALLOCATOR_ENV, **WORKER_LOGGING, "NCCL_DEBUG": "INFO", "MALLOC_ARENA_MAX": "4"}
    assert ALLOCATOR_ENV["MALLOC_ARENA_MAX"] == "1" and ALLOCATOR_ENV["MALLOC_MMAP_MAX_"] == "0"


def test_embed_section_and_options_over_it():
    from ray_job import build_parser
    from tumornet.config import load_config

    assert load_config("paper", []).embed.gpus_per_worker == 1 and load_config("demo", []).embed.workers == 2
    with pytest.raises(InputError, match="reduced precision is for GPU embedding only"):
        load_config("demo", ["embed.precision=bf16"])
    args = build_parser().parse_args(["embed", "--model", "m", "--manifest", "x", "--out", "o", "--secret-file", "k",
                                      "--threads", "3"])
    assert args.threads_per_worker == 3 and args.workers is None  # None: the config's value
