"""Driver side: config -> Ray `TorchTrainer` running `loop.train_func` on every worker.

Works as a plain local run (starts Ray itself) and inside `ray job submit ... -- python ray_job.py
train ...` (connects to the job's cluster). Re-running with the same run name and storage path
resumes from the run's latest checkpoint (Ray Train restores it), so a finished run returns at once.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tumornet.config import Config, config_to_dict
from tumornet.errors import InputError
from tumornet.runtime import ALLOCATOR_ENV


def storage_root(cfg: Config) -> str:
    p = cfg.distributed.storage_path
    return p if "://" in p else str(Path(p).expanduser().resolve())


# Ray Train's options for its worker processes: print() stays print() (Ray Train's print patch would
# send rank 0's epoch line both to its logger and to stdout: every line twice), and Ray Train's own
# INFO records (e.g. "Reporting training result N: TrainingReport(...)" per report) follow the job's
# Ray logging level (WARNING on the console, trainer.ray_setup) instead of its per-worker console logger.
WORKER_LOGGING = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0", "RAY_TRAIN_ENABLE_WORKER_STRUCTURED_LOGGING": "0"}


def run_training(cfg: Config, *, manifest: str | Path, run_name: str | None = None, fresh: bool = False) -> dict:
    """Train; -> summary dict (final metrics, checkpoint path, model path), also in <run>/result.json."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from .loop import split_scans, train_func
    from .ray_setup import init_ray, train_logging_config

    manifest = Path(manifest).resolve()
    if not manifest.is_file():
        raise InputError(f"{manifest}: manifest not found")
    d = cfg.distributed
    name = run_name or cfg.name
    root = storage_root(cfg)
    if "://" in root:
        raise InputError("distributed.storage_path: metrics and the exported model need a (shared) filesystem path")
    run_dir = Path(root) / name
    if fresh:  # start from scratch: Ray Train would otherwise restore the run of that name
        shutil.rmtree(run_dir, ignore_errors=True)
    # validate the cohort here, before any worker starts: every problem is reported at once
    _, train_ids, _ = split_scans(cfg, str(manifest))
    if len(train_ids) < d.workers:
        raise InputError(f"{manifest}: {len(train_ids)} training scan(s) for {d.workers} workers; "
                         "each worker needs at least one (lower distributed.workers)")
    init_ray()
    resources = {"CPU": d.cpus_per_worker, **({"GPU": d.gpus_per_worker} if d.use_gpu else {})}
    trainer = TorchTrainer(
        train_func,
        train_loop_config={"config": config_to_dict(cfg), "manifest": str(manifest), "run_dir": str(run_dir)},
        scaling_config=ScalingConfig(num_workers=d.workers, use_gpu=d.use_gpu, resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if d.use_gpu else "gloo"),
        run_config=RunConfig(name=name, storage_path=root, failure_config=FailureConfig(max_failures=d.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
                             worker_runtime_env={"env_vars": worker_env(cfg)},
                             logging_config=train_logging_config()),
    )
    result = trainer.fit()
    summary = {"run": name, "run_dir": str(run_dir), "metrics": result.metrics,
               "checkpoint": result.checkpoint.path if result.checkpoint else None,
               "model": str(run_dir / "model.pt")}
    (run_dir / "result.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def worker_env(cfg: Config) -> dict[str, str]:
    """Environment of the training worker processes: the CPU allocator settings (they only work
    from process start), Ray Train's worker logging (WORKER_LOGGING), then the config's
    `distributed.worker_env` (which may override either)."""
    return {**ALLOCATOR_ENV, **WORKER_LOGGING, **cfg.distributed.worker_env}
