"""Task schema: the per-tumor classification tasks and their classes.

A label is stored as a class index; a missing label is -1 everywhere (manifest -> records ->
batches -> loss). The default schema is the paper's five tasks; a site defines its own in the
config (`tasks:`), adding or dropping tasks.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from .errors import InputError

MISSING = -1
INFO_PREFIX = "info_"  # manifest columns of case information (tumornet.manifest), never a task


def is_info_column(name: str) -> bool:
    """A manifest column of case information: info_ followed by a name."""
    return name.startswith(INFO_PREFIX) and len(name) > len(INFO_PREFIX)

TUMOR_TYPES = ("metastasis", "meningioma", "schwannoma")
AREAS = (
    "frontal",
    "parietal",
    "temporal",
    "occipital",
    "insula",
    "deep_grey_matter",
    "ventricles",
    "cerebellum",
    "brainstem",
    "convexity_falx",
    "skull_base_cpa",
)


@dataclass(frozen=True, kw_only=True)
class Task:
    name: str
    classes: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.name.isidentifier():
            raise InputError(f"task name {self.name!r}: must be a plain identifier")
        if self.name.startswith(INFO_PREFIX):
            raise InputError(f"task name {self.name!r}: info_* names are the manifest's case information columns")
        if len(self.classes) < 2:
            raise InputError(f"task {self.name!r}: needs at least 2 classes, got {list(self.classes)}")
        if len(set(self.classes)) != len(self.classes):
            raise InputError(f"task {self.name!r}: duplicate class names in {list(self.classes)}")

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    def index(self, value: str | None, *, where: str = "") -> int:
        """Class name -> index; None or '' -> MISSING. A name is matched as written, else regardless of
        case and of spaces / hyphens for underscores ('Skull base-CPA' is skull_base_cpa) when that
        names one class. Unknown names raise, naming `where`."""
        if value is None or str(value).strip() == "":
            return MISSING
        v = str(value).strip()
        if v in self.classes:
            return self.classes.index(v)
        loose = [i for i, c in enumerate(self.classes) if _loose(c) == _loose(v)]
        if len(loose) == 1:
            return loose[0]
        raise InputError(f"{where}{self.name}: unknown class {v!r}; expected one of {list(self.classes)} or empty")

    def name_of(self, index: int) -> str:
        return "" if index == MISSING else self.classes[index]


def _loose(name: str) -> str:
    return "_".join(name.lower().replace("-", " ").replace("_", " ").split())


@dataclass(frozen=True)
class LabelSchema:
    tasks: tuple[Task, ...]

    def __post_init__(self) -> None:
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise InputError(f"tasks: duplicate task names in {names}")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tasks)

    def __getitem__(self, name: str) -> Task:
        for t in self.tasks:
            if t.name == name:
                return t
        raise KeyError(name)

    def __contains__(self, name: object) -> bool:
        return name in self.names

    def encode(self, names: Mapping[str, str | None], *, where: str = "") -> dict[str, int]:
        """{task: class name or empty} -> {task: index or -1}; absent tasks are missing."""
        return {t.name: t.index(names.get(t.name), where=where) for t in self.tasks}

    def decode(self, labels: Mapping[str, int]) -> dict[str, str]:
        return {t.name: t.name_of(labels.get(t.name, MISSING)) for t in self.tasks}

    def to_dict(self) -> dict[str, list[str]]:
        return {t.name: list(t.classes) for t in self.tasks}

    @classmethod
    def from_dict(cls, d: Mapping[str, object], *, where: str = "tasks") -> LabelSchema:
        if not isinstance(d, Mapping) or not d:
            raise InputError(f"{where}: expected a mapping task -> list of class names")
        tasks = []
        for name, classes in d.items():
            if not isinstance(classes, list | tuple) or not all(isinstance(c, str) for c in classes):
                raise InputError(f"{where}.{name}: expected a list of class names, got {classes!r}")
            tasks.append(Task(name=str(name), classes=tuple(classes)))
        return cls(tuple(tasks))


DEFAULT_SCHEMA = LabelSchema(
    (
        Task(name="tumor_type", classes=TUMOR_TYPES),
        Task(name="area", classes=AREAS),
        Task(name="left_right", classes=("left", "right")),
        Task(name="front_rear", classes=("front", "rear")),
        Task(name="upper_lower", classes=("upper", "lower")),
    )
)
