"""The per-worker training function: one `train_func(config)` per Ray Train worker.

Each worker builds the model, wraps it with `deepspeed.initialize` (ZeRO stage, gradient
accumulation, bf16 on GPU / fp32 on CPU), resumes from `ray.train.get_checkpoint()` when there is
one, trains on its shard of the training scans, validates on its shard of the held-out scans, and
at every checkpoint every rank saves its DeepSpeed state and calls `ray.train.report` (never rank 0
alone: that hangs). Rank 0 writes metrics (JSONL + TensorBoard) and, at the end, the exported model.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from tumornet.boxes import distort_box
from tumornet.cache import prepare_scan
from tumornet.config import Config, TrainConfig, config_from_dict, config_to_dict
from tumornet.descriptor import stack_parts, tumors_parts
from tumornet.drawn import fit_drawn_size
from tumornet.export import export_model, model_id
from tumornet.fitted import fit_heads, fit_size, fit_stats
from tumornet.io import atomic_write
from tumornet.labels import MISSING
from tumornet.loss import EmbeddingBank, as_float32, multitask_loss
from tumornet.manifest import read_manifest
from tumornet.network import MultitaskNet
from tumornet.register import register
from tumornet.runtime import tune_cpu_allocator
from tumornet.split import record_split, split_scan_ids
from tumornet.tumors import equivalent_diameter_mm
from tumornet.volumes import head_box_voxels

from .data import PatchStream, validation_batches
from .metrics import MetricsWriter, add_sums, validation_metrics, validation_sums

STATE_FILE = "trainer_state.json"
CKPT_TAG = "state"


def deepspeed_config(cfg: Config) -> dict:
    d = cfg.distributed
    ds = {
        "train_micro_batch_size_per_gpu": cfg.train.batch_size,
        "gradient_accumulation_steps": d.grad_accum,
        "zero_optimization": {"stage": d.zero_stage},
        "zero_allow_untested_optimizer": True,  # SGD with ZeRO 1/2
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if d.bf16:
        ds["bf16"] = {"enabled": True}
    return ds


def split_scans(cfg: Config, manifest: str) -> tuple[dict, list[str], list[str]]:
    """The run's cohort -> (scan rows by id, training scan ids, scan ids of the per-epoch held-out
    metrics: the validation split when there is one, else the test split (monitored, never chosen on))."""
    cohort = read_manifest(manifest, cfg.tasks)
    train, val, test = split_scan_ids(cohort, test_fraction=cfg.data.test_fraction, seed=cfg.data.split_seed,
                                      validation_fraction=cfg.data.validation_fraction)
    return cohort.scans(), train, val or test


def _to(batch: dict, device, dtype=torch.float32):
    """-> (image, seg, boxes, labels, frames) on the device."""
    return (torch.from_numpy(batch["image"]).to(device=device, dtype=dtype), torch.from_numpy(batch["seg"]).to(device),
            torch.from_numpy(batch["boxes"]), {k: torch.from_numpy(v).to(device) for k, v in batch["labels"].items()},
            torch.from_numpy(batch["frame"]).to(device))


def _metric_name(term: str) -> str:
    """Loss term -> metric name: total -> loss, seg -> loss_seg, task/<name> -> loss_<name>."""
    return {"total": "loss", "seg": "loss_seg"}.get(term, term.replace("task/", "loss_"))


def _all_reduce(sums: dict[str, float], device) -> dict[str, float]:
    """Named sums added over all ranks (every rank holds the same keys)."""
    keys = sorted(sums)
    t = torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=device)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(t)
    return dict(zip(keys, t.tolist(), strict=True))


def evaluate(engine, scans, cfg: Config, device, dtype) -> dict:
    """Held-out losses, segmentation Dice and per-task accuracy (summed over all ranks)."""
    tasks = list(cfg.tasks.names)
    sums: dict[str, float] = {"batches": 0.0, "loss": 0.0, "loss_seg": 0.0, "loss_tasks": 0.0,
                              "dice_intersection": 0.0, "dice_volumes": 0.0,
                              **{f"{s}/{t}": 0.0 for t in tasks for s in ("correct", "known")}}
    engine.eval()
    with torch.no_grad():
        for batch in validation_batches(scans, cfg.train, tasks):
            x, seg, boxes, labels, frame = _to(batch, device, dtype)
            out = as_float32(engine(x, boxes, frame))
            terms = multitask_loss(out, seg, labels, cfg.loss, boxes=boxes)
            sums = add_sums(sums, validation_sums(out, seg, labels, terms, tasks))
    engine.train()
    return validation_metrics(_all_reduce(sums, device), tasks)


def scan_cache_dir(cfg: Config) -> str:
    """Where preprocessed scans are cached (train.cache_dir; default ~/.cache/tumornet/scans)."""
    return cfg.train.cache_dir or str(Path.home() / ".cache" / "tumornet" / "scans")


def retrieval_stats(model: MultitaskNet, scans, cfg: Config, *, patients=None, max_tumors: int = 400,
                    seed: int = 1) -> dict:
    """The training tumors' statistics of the retrieval parts (tumornet.descriptor.fit_stats) and the
    task heads refit on them (fit_heads), from the training scans (at most `max_tumors` tumors, every
    k-th scan): stored in the model file, so that embed and search compose the same vectors. With
    `retrieval.head_draws` the heads are also fit on that many rough-box copies of every tumor (the
    paper's eq. 2, drawn with `seed`). `patients`: each scan's patient, so that `retrieval.head_select:
    cv` keeps a patient's tumors in one fold (None: every scan its own patient)."""
    scans = list(scans)
    patients = list(range(len(scans))) if patients is None else list(patients)
    total = sum(len(s.tumors) for s in scans)
    step = max(1, -(-total // max_tumors))  # scans spread over the whole list, not its start
    parts, labels, sizes, groups, rough_groups = [], {t: [] for t in cfg.tasks.names}, [], [], []
    exact_extents, rough_extents = [], []  # each box's tumor extent, for the drawn-box size regression
    rough, rough_labels = [], {t: [] for t in cfg.tasks.names}
    voxel_mm3 = float(np.prod(np.broadcast_to(np.asarray(cfg.data.spacing_mm, float), 3)))
    rng = np.random.default_rng(seed)
    draws = cfg.retrieval.head_draws
    for s, patient in zip(scans[::step], patients[::step], strict=True):
        image, instances = (np.asarray(a) for a in s.arrays())
        head = head_box_voxels(image)
        # the cache keeps no origin: none is needed, the registration's translation absorbs it; the
        # refit heads below are fit on the recipe's frame whether or not the recipe reads them
        exact = [t.bbox for t in s.tumors]
        frame = (register(image, np.diag([*s.spacing_mm, 1.0]), warp_mm=cfg.retrieval.warp_mm,
                          ignore=exact if cfg.retrieval.frame_skips_tumors else None)
                 if cfg.retrieval.position_frame != "head" else None)
        # two passes: the exact boxes' parts (and so the statistics) the same whatever head_draws is
        # the exact boxes' size as their masks measure it (tumornet.tumors.tumor_extent), as embed reads it
        for boxes, out, extents in ((exact, parts, [t.extent for t in s.tumors]),
                                    ([distort_box(b, rng) for _ in range(draws) for b in exact], rough, None)):
            if boxes:
                out += tumors_parts(model, image, boxes, patch_size=cfg.train.patch_size,
                                    spacing_mm=cfg.data.spacing_mm, head=head, frame=frame, extents=extents,
                                    scan_tumors=len(s.tumors), mirror=cfg.retrieval.mirror)
        for task in labels:
            of_scan = [t.labels.get(task, MISSING) for t in s.tumors]
            labels[task] += of_scan
            rough_labels[task] += of_scan * draws  # the rough boxes' order: draw by draw, the scan's tumors
        exact_extents += [t.extent for t in s.tumors]
        rough_extents += [t.extent for t in s.tumors] * draws  # in the rough boxes' order, as the labels
        groups += [patient] * len(s.tumors)  # cross-validation folds by patient (head_select: cv); never stored
        rough_groups += [patient] * (len(s.tumors) * draws)
        sizes += [equivalent_diameter_mm(max(np.count_nonzero(instances == t.tumor_id), 1) * voxel_mm3)
                  for t in s.tumors]
    stats = fit_stats(parts)
    stacked = stack_parts(parts)
    stats.update(fit_size(stacked, np.asarray(sizes), stats))  # the size on the working grid, from the mask
    heads_on = stack_parts(parts + rough)
    if draws:  # the drawn-box size regression (retrieval.drawn_read: fit), from the exact and rough boxes
        true = np.asarray(exact_extents + rough_extents)
        stats.update(fit_drawn_size(heads_on["span_profile"], heads_on["extent"], true))
    fit = functools.partial(fit_heads, heads_on, {k: np.asarray(labels[k] + rough_labels[k]) for k in labels},
                            cfg.tasks, stats, position_frame=cfg.retrieval.position_frame,
                            size_source=cfg.retrieval.size_source, select=cfg.retrieval.head_select,
                            groups=np.asarray(groups + rough_groups))
    stats["heads"] = fit(scan_count=cfg.retrieval.scan_count, count_weight=cfg.retrieval.count_weight)
    if cfg.retrieval.scan_count:  # for tumors whose scan's count is unknown (tumornet.fitted.refit_probabilities)
        stats["heads_uncounted"] = fit()
    return stats


def with_recipe(path, out, overrides: list[str], manifest) -> str:
    """A copy of a model file with any retrieval keys changed (`retrieval.<key>=<value>`) and the
    recipe's statistics and refit heads fit again on the model's training scans (its recorded split
    applied to `manifest`, as at export) -> the model id: the same weights, so no training, but other
    vectors, so `embed` embeds the archive again (the settings fingerprint changes)."""
    from tumornet.export import load_model, retuned_recipe
    from tumornet.split import split_of_model

    payload, retrieval = retuned_recipe(path, overrides, search_only=False)
    model, meta = load_model(path)
    extra = payload["extra"]
    cfg = config_from_dict({**extra["config"], "retrieval": retrieval})
    # the grid and patch the model was trained on, as recorded, and its own tasks
    cfg = dataclasses.replace(cfg, tasks=model.schema,
                              data=dataclasses.replace(cfg.data, spacing_mm=tuple(extra["spacing_mm"])),
                              train=dataclasses.replace(cfg.train, patch_size=int(extra.get("patch_size") or 64)))
    cohort = read_manifest(manifest, model.schema)
    on = "validation" if (extra.get("split") or {}).get("validation_patients") else "test"
    train_ids = split_of_model(cohort, meta, where=str(path), on=on)[0]  # the scans the model was trained on
    scans = cohort.scans()
    train = [prepare_scan(scans[s], spacing_mm=cfg.data.spacing_mm, cache_dir=scan_cache_dir(cfg)) for s in train_ids]
    extra["config"]["retrieval"] = retrieval
    extra["retrieval_stats"] = json.loads(json.dumps(
        retrieval_stats(model, train, cfg, patients=[scans[s][0].patient_id for s in train_ids]), default=float))
    atomic_write(out, lambda tmp: torch.save(payload, tmp))
    return payload["model_id"]


def failure_injector(cfg: Config, rank: int, world: int, run_dir: Path):
    """Fault-tolerance tests (`train.fail_at_step`): -> step -> None that kills the last worker once,
    right after that step (a marker file keeps the restarted run from failing again); None when off."""
    at = cfg.train.fail_at_step
    if at is None or rank != world - 1:
        return None

    def after_step(step: int) -> None:
        marker = run_dir / ".injected_failure"
        if step + 1 == at and not marker.exists():
            marker.write_text(f"worker {rank} killed after step {step + 1}\n")
            os._exit(1)

    return after_step


def make_optimizer(model: torch.nn.Module, t: TrainConfig) -> torch.optim.Optimizer:
    """`train.optimizer`: SGD with (Nesterov) momentum, the paper's, or AdamW."""
    if t.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=t.lr, momentum=t.momentum, nesterov=t.nesterov,
                           weight_decay=t.weight_decay)


def train_func(loop_config: dict) -> None:
    import ray.train

    cfg = config_from_dict(loop_config["config"], source="train_loop_config")
    run_dir = Path(loop_config["run_dir"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    gpu = cfg.distributed.use_gpu
    if not gpu:
        os.environ["DS_ACCELERATOR"] = "cpu"
        tune_cpu_allocator()
    import deepspeed

    if not gpu:  # training all-reduces go through gloo; skip the shm inference op (a 30 s g++ build)
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    device = torch.device(f"cuda:{ctx.get_local_rank()}") if gpu else torch.device("cpu")
    dtype = torch.bfloat16 if cfg.distributed.bf16 else torch.float32

    scans, train_ids, val_ids = split_scans(cfg, loop_config["manifest"])
    cache_dir = scan_cache_dir(cfg)
    mine = [prepare_scan(scans[s], spacing_mm=cfg.data.spacing_mm, cache_dir=cache_dir) for s in train_ids[rank::world]]
    val_mine = [prepare_scan(scans[s], spacing_mm=cfg.data.spacing_mm, cache_dir=cache_dir)
                for s in val_ids[rank::world]]

    torch.manual_seed(cfg.train.seed)
    model = MultitaskNet(cfg.model, cfg.tasks)
    opt = make_optimizer(model, cfg.train)
    # DeepSpeed broadcasts and flattens parameters as contiguous tensors: initialize with contiguous
    # weights; without ZeRO the parameters stay ours, so they go back to channels_last_3d after
    model.to(memory_format=torch.contiguous_format)
    engine, opt, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=deepspeed_config(cfg))
    if cfg.distributed.zero_stage == 0:
        engine.module.to(memory_format=model.memory_format)

    start = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            engine.load_checkpoint(d, tag=CKPT_TAG)
            start = json.loads((Path(d) / STATE_FILE).read_text())["step"]
    t = cfg.train
    total = t.epochs * t.batches_per_epoch
    writer = MetricsWriter(run_dir, resume_step=start) if rank == 0 else None
    stream = PatchStream(mine, t, cfg.tasks.names, rank=rank, start_step=start, end_step=total)
    sums: dict[str, float] = {}
    inject_failure = failure_injector(cfg, rank, world, run_dir)
    bank = EmbeddingBank(cfg.loss.metric_memory) if cfg.loss.metric > 0 else None
    try:
        for _ in range(start, total):
            t0 = time.perf_counter()
            step, batch, waited = stream.next()
            epoch = step // t.batches_per_epoch
            for g in opt.param_groups:
                g["lr"] = t.lr_at(epoch)
            x, seg, boxes, labels, frame = _to(batch, device, dtype)
            out = as_float32(engine(x, boxes, frame))
            terms = multitask_loss(out, seg, labels, cfg.loss, bank, boxes)
            engine.backward(terms["total"])
            if bank is not None:
                bank.push(out["embedding"], labels)
            engine.step()
            if inject_failure:
                inject_failure(step)
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
            sums["wait_s"] = sums.get("wait_s", 0.0) + waited
            sums["step_s"] = sums.get("step_s", 0.0) + time.perf_counter() - t0
            sums["steps"] = sums.get("steps", 0.0) + 1
            if (step + 1) % t.batches_per_epoch:
                continue
            red = _all_reduce(sums, device)
            n = red["steps"]
            metrics = {"step": step + 1, "epoch": epoch + 1, "lr": t.lr_at(epoch),
                       "data_wait_share": red["wait_s"] / red["step_s"],
                       "samples_per_s": n * t.batch_size / (red["step_s"] / world),
                       "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                       "torch_threads": torch.get_num_threads(),
                       "malloc_arena_max": int(os.environ.get("MALLOC_ARENA_MAX", 0))}
            metrics.update({f"train/{_metric_name(k)}": red[k] / n for k in sorted(red)
                            if k not in ("wait_s", "step_s", "steps")})
            if (epoch + 1) % t.val_every == 0 or step + 1 == total:
                metrics.update(evaluate(engine, val_mine, cfg, device, dtype))
            sums = {}
            if (epoch + 1) % t.checkpoint_every == 0 or step + 1 == total:
                with tempfile.TemporaryDirectory() as d:
                    engine.save_checkpoint(d, tag=CKPT_TAG)
                    if rank == 0:
                        state = {"step": step + 1, "epoch": epoch + 1, "model_id": model_id(engine.module.state_dict()),
                                 "tasks": cfg.tasks.to_dict(), "config": config_to_dict(cfg)}
                        (Path(d) / STATE_FILE).write_text(json.dumps(state))
                    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
            else:
                ray.train.report(metrics)
            if writer:
                writer.write(metrics)
    finally:
        stream.close()
        if writer:
            writer.close()
    if rank == 0:
        final = MultitaskNet(cfg.model, cfg.tasks)
        final.load_state_dict({k: (v.float() if v.is_floating_point() else v).cpu()
                               for k, v in engine.module.state_dict().items()})
        spacing = [float(v) for v in np.broadcast_to(cfg.data.spacing_mm, 3)]
        cohort = read_manifest(loop_config["manifest"], cfg.tasks)
        all_train = [prepare_scan(scans[s], spacing_mm=cfg.data.spacing_mm, cache_dir=cache_dir) for s in train_ids]
        patients = [scans[s][0].patient_id for s in train_ids]  # the refit heads' folds (head_select: cv)
        extra = {"spacing_mm": spacing, "patch_size": t.patch_size, "steps": total, "run": run_dir.name,
                 "config": config_to_dict(cfg),
                 "retrieval_stats": retrieval_stats(final, all_train, cfg, patients=patients),
                 "split": record_split(cohort, test_fraction=cfg.data.test_fraction, seed=cfg.data.split_seed,
                                       validation_fraction=cfg.data.validation_fraction)}
        export_model(final, run_dir / "model.pt", extra=extra)
