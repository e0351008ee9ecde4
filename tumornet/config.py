"""Run configuration: YAML -> frozen keyword-only dataclasses, validated at load.

Every unknown key, wrong type or bad value raises InputError naming the file and the dotted key.
`key=value` overrides (e.g. `phantom.patients=40`) are applied to the YAML text before validation;
values are parsed as YAML scalars / lists.

The typed `Config` is the only source of truth: a derived config is `dataclasses.replace(...)` of
it, and what crosses a process boundary (Ray Train workers, the exported model, a checkpoint) is
`config_to_dict(cfg)`, read back with `config_from_dict` (a round trip gives an equal Config).
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .detect import DetectConfig
from .errors import InputError
from .labels import DEFAULT_SCHEMA, LabelSchema
from .loss import LossWeights
from .network import NetConfig
from .recipe import RetrievalConfig
from .synth.phantom import PhantomConfig
from .volumes import as_spacing


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    # the cohort manifest (CSV / Parquet) for train / sweep / experiment when --manifest is not given;
    # None: the command needs --manifest (the demo passes the synthetic cohort it generates)
    manifest: str | None = None
    # the working grid: every scan, synthetic or real, is resampled to it for training and embedding
    # (phantom.voxel_mm is only the voxel size the synthetic scans are written at)
    spacing_mm: float | tuple[float, float, float] = 1.0
    test_fraction: float = 0.2
    # patients held out of training to choose a recipe on (`evaluate --on validation`); 0 for a final run
    validation_fraction: float = 0.0
    split_seed: int = 0

    def __post_init__(self) -> None:
        as_spacing(self.spacing_mm)
        if not 0.0 <= self.test_fraction < 1.0:
            raise InputError(f"data.test_fraction: must be in [0, 1), got {self.test_fraction}")
        if not 0.0 <= self.validation_fraction < 1.0 - self.test_fraction:
            raise InputError(f"data.validation_fraction: must be in [0, 1 - test_fraction), got "
                             f"{self.validation_fraction}")


OPTIMIZERS = ("sgd", "adamw")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """The optimisation (paper: SGD + Nesterov, lr 0.1, /10 at epochs 90 and 105, 120 x 200 x 2)."""

    epochs: int = 120
    batches_per_epoch: int = 200  # per worker
    batch_size: int = 2  # per worker
    patch_size: int = 120  # voxels of the working grid (data.spacing_mm)
    optimizer: str = "sgd"  # sgd (the paper: momentum, nesterov) or adamw (lr ~1e-3; momentum/nesterov unused)
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 0.0
    milestones: tuple[int, ...] = (90, 105)
    gamma: float = 0.1
    val_every: int = 1  # epochs
    checkpoint_every: int = 1  # epochs
    keep_checkpoints: int = 2
    seed: int = 0
    flip_lr: bool = True
    intensity_scale: float = 0.1
    intensity_shift: float = 0.1
    box_jitter: bool = False
    # share of training patches placed anywhere in the scan, with or without a tumor (0: the paper's
    # sampling, every patch around a tumor): the segmentation then sees background, for detection
    background_fraction: float = 0.0
    # tumors darker than the tissue around them (tumornet.tumors.is_dark: necrotic metastases whose thin
    # rim a 2 mm grid loses) are picked for a patch this many times as often as the others (1: as often)
    dark_weight: float = 1.0
    prefetch: int = 4  # batches prepared ahead by a background thread
    cache_dir: str | None = None  # preprocessed scans; None = ~/.cache/tumornet/scans
    fail_at_step: int | None = None  # inject one worker failure at this step (fault-tolerance tests)

    def __post_init__(self) -> None:
        for key in ("epochs", "batches_per_epoch", "batch_size", "val_every", "checkpoint_every", "keep_checkpoints"):
            if getattr(self, key) < 1:
                raise InputError(f"train.{key}: must be >= 1, got {getattr(self, key)}")
        if self.patch_size < 8:
            raise InputError(f"train.patch_size: must be >= 8 voxels, got {self.patch_size}")
        if self.lr <= 0:
            raise InputError(f"train.lr: must be > 0, got {self.lr}")
        if self.optimizer not in OPTIMIZERS:
            raise InputError(f"train.optimizer: expected one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if not 0.0 <= self.background_fraction < 1.0:
            raise InputError(f"train.background_fraction: must be in [0, 1), got {self.background_fraction}")
        if not self.dark_weight > 0:
            raise InputError(f"train.dark_weight: must be > 0, got {self.dark_weight}")

    def lr_at(self, epoch: int) -> float:
        """Step schedule: lr x gamma^(number of milestones <= epoch)."""
        return self.lr * self.gamma ** sum(1 for m in self.milestones if epoch >= m)


@dataclass(frozen=True, kw_only=True)
class DistributedConfig:
    """Ray Train scaling + DeepSpeed engine settings."""

    workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: int = 1
    gpus_per_worker: int = 1  # used when use_gpu
    zero_stage: int = 0  # DeepSpeed ZeRO 0, 1 or 2
    grad_accum: int = 1
    bf16: bool = False  # GPU only: CPU runs stay fp32
    storage_path: str = "runs"  # relative paths are made absolute; multi-node: shared storage or s3://
    max_failures: int = 2
    # environment of every training worker process, on top of tumornet.runtime.ALLOCATOR_ENV
    # (e.g. NCCL_DEBUG: INFO); values are strings
    worker_env: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for key, value in self.worker_env.items():
            if not key or isinstance(value, bool) or not isinstance(value, (str, int, float)):
                raise InputError(f"distributed.worker_env.{key}: expected a string value, got {value!r}")
        object.__setattr__(self, "worker_env", {k: str(v) for k, v in self.worker_env.items()})
        if self.workers < 1 or self.cpus_per_worker < 1 or self.grad_accum < 1:
            raise InputError("distributed: workers, cpus_per_worker and grad_accum must be >= 1")
        if self.zero_stage not in (0, 1, 2):
            raise InputError(f"distributed.zero_stage: expected 0, 1 or 2, got {self.zero_stage}")
        if self.bf16 and not self.use_gpu:
            raise InputError("distributed.bf16: bf16 is for GPU runs only (CPU bf16 is hundreds of times slower)")


@dataclass(frozen=True, kw_only=True)
class EmbedConfig:
    """The archive embedding job (`ray_job.py embed`; its options override these)."""

    workers: int = 2  # Ray Data actors, each loads the model once
    threads_per_worker: int = 1  # CPUs (torch threads) per actor
    gpus_per_worker: float = 0.0  # 0: CPU, fp32; > 0: CUDA, reads in CPU tasks
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast on GPU only)
    scans_per_shard: int = 8
    max_failure_rate: float = 0.05  # exit 1 above this share of failed or skipped scans
    detector: str = ""  # a model file whose segmentation head finds tumors without a mask ("": the model's own)

    def __post_init__(self) -> None:
        if min(self.workers, self.threads_per_worker, self.scans_per_shard) < 1 or self.gpus_per_worker < 0:
            raise InputError("embed: workers, threads_per_worker and scans_per_shard must be >= 1, "
                             "gpus_per_worker >= 0")
        check_precision(self.gpus_per_worker > 0, self.precision)
        if not 0.0 <= self.max_failure_rate <= 1.0:
            raise InputError(f"embed.max_failure_rate (--max-failure-rate): expected a share in [0, 1], got "
                             f"{self.max_failure_rate}")


def check_precision(on_gpu: bool, precision: str) -> None:
    """fp32 anywhere; bf16 / fp16 on CUDA only (on CPU bf16 is hundreds of times slower)."""
    if precision not in ("fp32", "bf16", "fp16"):
        raise InputError(f"embed.precision (--precision): expected fp32, bf16 or fp16, got {precision!r}")
    if precision != "fp32" and not on_gpu:
        raise InputError(f"embed.precision {precision}: reduced precision is for GPU embedding only (set "
                         "embed.gpus_per_worker, --gpus-per-worker); on CPU the job runs in fp32")


@dataclass(frozen=True, kw_only=True)
class Config:
    name: str = "run"
    tasks: LabelSchema = DEFAULT_SCHEMA
    data: DataConfig = field(default_factory=DataConfig)
    phantom: PhantomConfig = field(default_factory=PhantomConfig)
    model: NetConfig = field(default_factory=NetConfig)
    loss: LossWeights = field(default_factory=LossWeights)
    train: TrainConfig = field(default_factory=TrainConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    detect: DetectConfig = field(default_factory=DetectConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)


SECTIONS = {"data": DataConfig, "phantom": PhantomConfig, "model": NetConfig, "loss": LossWeights,
            "train": TrainConfig, "distributed": DistributedConfig, "retrieval": RetrievalConfig,
            "detect": DetectConfig, "embed": EmbedConfig}


def _check_value(value: Any, annotation: Any, where: str) -> Any:
    """Light type check against a dataclass field annotation; lists become tuples."""
    hint = annotation.__name__ if isinstance(annotation, type) else str(annotation)
    hint = hint.replace("typing.", "").replace("collections.abc.", "")
    if isinstance(value, list):
        if "tuple" not in hint:
            raise InputError(f"{where}: expected {hint}, got a list")
        return tuple(value)
    if isinstance(value, bool):
        if "bool" not in hint:
            raise InputError(f"{where}: expected {hint}, got a boolean")
        return value
    if isinstance(value, int) and ("int" in hint or "float" in hint):
        return value
    if isinstance(value, float) and "float" in hint:
        return value
    if isinstance(value, str) and "str" in hint:
        return value
    if value is None and "None" in hint:
        return None
    if isinstance(value, dict) and "Mapping" in hint:
        return dict(value)
    raise InputError(f"{where}: expected {hint}, got {type(value).__name__} {value!r}")


def build_section(cls, d: Any, where: str):
    if d is None:
        d = {}
    if not isinstance(d, dict):
        raise InputError(f"{where}: expected a mapping, got {type(d).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in d.items():
        if key not in names:
            raise InputError(f"{where}.{key}: unknown key; expected one of {names}")
        kwargs[key] = _check_value(value, hints[key], f"{where}.{key}")
    try:
        return cls(**kwargs)
    except InputError as e:  # a section's own check may name its key already ("loss.metric: ...")
        raise InputError(str(e) if str(e).startswith(f"{where}.") else f"{where}: {e}") from None


def apply_overrides(raw: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for item in overrides:
        if "=" not in item:
            raise InputError(f"override {item!r}: expected key=value, e.g. phantom.patients=40")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        node = raw
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise InputError(f"override {item!r}: {p} is not a section")
        node[parts[-1]] = yaml.safe_load(value)
    return raw


def config_from_dict(raw: dict, *, source: str = "config") -> Config:
    if not isinstance(raw, dict):
        raise InputError(f"{source}: expected a mapping at the top level")
    allowed = ["name", "tasks", *SECTIONS]
    for key in raw:
        if key not in allowed:
            raise InputError(f"{source}: {key}: unknown key; expected one of {allowed}")
    try:
        kwargs: dict[str, Any] = {k: build_section(cls, raw.get(k), k) for k, cls in SECTIONS.items()}
        if raw.get("tasks") not in (None, "default"):
            kwargs["tasks"] = LabelSchema.from_dict(raw["tasks"])
        if "name" in raw:
            kwargs["name"] = _check_value(raw["name"], "str", "name")
    except InputError as e:
        raise InputError(f"{source}: {e}") from None
    return Config(**kwargs)


# the project's bundled configs (the repository's configs/ beside the packages), so that the installed
# `tumor-retrieval` command finds `demo` or `configs/demo.yaml` from any working directory
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


def find_config(name: str | Path) -> Path:
    """A config file: the path as given when it exists, else a bundled config by name (`demo`,
    `demo.yaml` or `configs/demo.yaml`)."""
    path = Path(name)
    if path.is_file():
        return path
    for candidate in (CONFIG_DIR / path.name, CONFIG_DIR / f"{path.name}.yaml"):
        if candidate.is_file() and (len(path.parts) == 1 or path.parent.name == "configs"):
            return candidate
    bundled = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    raise InputError(f"{path}: config file not found (bundled configs: {bundled})")


def load_config(path: str | Path, overrides=()) -> Config:
    path = find_config(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise InputError(f"{path}: not valid YAML ({e})") from None
    return config_from_dict(apply_overrides(raw, overrides), source=str(path))


def _plain(v: Any) -> Any:
    if dataclasses.is_dataclass(v):
        return {f.name: _plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
    if isinstance(v, Mapping):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, tuple | list):
        return [_plain(x) for x in v]
    return v


def config_to_dict(cfg: Config) -> dict:
    """The typed config as plain YAML/JSON types; `config_from_dict` of it gives an equal Config."""
    return {"name": cfg.name, "tasks": cfg.tasks.to_dict(),
            **{key: _plain(getattr(cfg, key)) for key in SECTIONS}}


def with_overrides(cfg: Config, **sections: Mapping[str, Any]) -> Config:
    """A derived config: `with_overrides(cfg, model={"channels": 16})` replaces keys of sections,
    validated like the YAML (the typed config stays the source; nothing is re-parsed from text)."""
    for key, updates in sections.items():
        if key not in SECTIONS:
            raise InputError(f"{key}: unknown config section; expected one of {list(SECTIONS)}")
        cfg = dataclasses.replace(cfg, **{key: dataclasses.replace(getattr(cfg, key), **updates)})
    return cfg
