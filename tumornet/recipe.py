"""The retrieval recipe (config section `retrieval`): what the vector of a tumor is made of, with which
weights, read in which frame, and the search-time settings (tumornet.descriptor composes the vector
from it; README: Configuration and Retrieval quality). Validated on construction: a bad key names
itself."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import InputError
from .fitted import HEAD_SELECT, POSITION_FRAMES, SIZE_SOURCES, SIZE_UNITS, size_key
from .register import check_warp_mm

DRAWN_READS = ("span", "fit")  # retrieval.drawn_read

# recipe keys of the search, not of a stored vector: a model file's may change without embedding again
SEARCH_ONLY = ("rerank", "rerank_size", "rerank_position", "refine_box", "drawn_size", "drawn_read")


@dataclass(frozen=True, kw_only=True)
class RetrievalConfig:
    roipool: float = 1.0  # weight of the RoiPool vector (the paper's embedding)
    standardize: bool = False  # z-score the RoiPool dims first (training tumors' mean and sd)
    tasks: float = 0.0  # weight of each task head's class probabilities
    size: float = 0.0  # weight of the box's log volume
    position: float = 0.0  # weight of the box centre's place in the head
    seg_size: float = 0.0  # weight of the segmented log volume in and around the box
    roimean: float = 0.0  # weight of the feature map's mean over the box
    context: float = 0.0  # weight of the feature map's mean over a shell around the box
    # the standardized RoiPool vector decorrelated too (PCA whitening with the training tumors' covariance)
    whiten: bool = False
    # the `tasks` part's probabilities: from the network's task heads, or from heads refit at export on
    # the training tumors' RoiPool vector, position and box size (fit_heads, stored in the model file)
    heads: str = "network"
    # which place of the box the `position` part and the refit heads read: the head's foreground box
    # ("head"), or the template after the scan's affine registration ("template", tumornet.register)
    position_frame: str = "head"
    # what the `size` and `seg_size` parts read: the log volume ("log"), or the equivalent-sphere
    # diameter in mm ("mm": linear, so a size difference between large tumors counts more, as in mm)
    size_units: str = "log"
    # the `tasks` part's probabilities are softmax(logits / task_temperature): below 1 sharper (a
    # tumor's likely class counts more, its doubts less), above 1 softer
    task_temperature: float = 1.0
    # which volume the `size` part and the refit heads read as the tumor's size: the box's ("box"), the
    # one the segmentation head calls tumor ("seg": a rough box changes it little), or a regression fit at
    # export on the training tumors' masks from both and the RoiPool vector ("fit", fit_size)
    size_source: str = "box"
    # the refit heads are also fit on this many rough-box copies of every training tumor (the paper's
    # eq. 2, as a query's box may be drawn: tumornet.boxes.distort_box), so that they hold on a rough box
    head_draws: int = 0
    # search in two stages: the `rerank` nearest by this vector (0: one stage), re-ordered by the distance
    # with the size / position parts weighed `rerank_size` / `rerank_position` instead (None: as in the
    # vector): the nearest in labels first, the closest in size and place among them. Search-time only:
    # the stored vectors do not change (rerank_scales)
    rerank: int = 0
    rerank_size: float | None = None
    rerank_position: float | None = None
    # a drawn box (search --box, and the robustness evaluation's distorted boxes) is first replaced by the
    # box of the tumor the segmentation head finds in it (refine_box). Search-time only, like rerank
    refine_box: bool = False
    # a drawn box's size (search --box, and the robustness evaluation's distorted boxes): its own extent
    # per axis (0), or its log blended with this weight toward the extent the segmentation head's tumor
    # probability spans inside it (tumornet.drawn.tumor_span; twentieth round: a loose box reads
    # nearer the tumor's size). Search-time only, like rerank
    drawn_size: float = 0.0
    # what a drawn box's size is moved toward (with weight drawn_size): the span the segmentation's tumor
    # probability covers in it ("span"), or the tumor's extent that a regression fit at export on the
    # training tumors' exact and rough boxes reads from that probability's profile in the box ("fit",
    # tumornet.drawn.fit_drawn_size; twenty-fifth round: a box too loose reads smaller, one too tight
    # larger). Search-time only, like drawn_size
    drawn_read: str = "span"
    # how the refit heads are fit: every head on all of head_inputs with C = 1 ("fixed"), or per task the
    # inputs (all, the box's place and size, or its place alone) and C chosen by cross-validation over the
    # training patients ("cv", tumornet.fitted.select_head: eleventh round); "cv-context": the same with
    # everything plus the feature map around the box (`context`) as one more choice (fourteenth round)
    head_select: str = "fixed"
    # the scan's registration onto the template (position_frame template / atlas): affine only (0), or
    # then a smooth deformation on control points this many mm apart (tumornet.register, fifteenth
    # round), so that the atlas reads a brain whose parts sit otherwise than the template's
    warp_mm: float = 0.0
    # the registration leaves the tumors' boxes (a search by box: the drawn box) out of its similarity,
    # each grown by tumornet.register.IGNORE_MARGIN_MM, so that a tumor does not pull the fit (sixteenth
    # round)
    frame_skips_tumors: bool = False
    # the refit heads also read how many tumors the scan holds (`scan_log_tumors`: log of the count; several
    # tumors in one scan are metastases far more often than not: seventeenth round). A search by box counts
    # them with the segmentation head unless told (search --scan-tumors)
    scan_count: bool = False
    # with scan_count, the count's z-score is multiplied by this in the refit heads' inputs: above 1 their
    # L2 penalty pulls its coefficient less toward 0 than the 32-128 other inputs' (eighteenth round)
    count_weight: float = 1.0
    # the pooled features (RoiPool vector, mean, context) are the mean of the scan's and of its left-right
    # mirror image's (tumornet.descriptor.tumors_parts: one more forward pass per tumor; twenty-second round)
    mirror: bool = False

    def __post_init__(self) -> None:
        weights = (self.roipool, self.tasks, self.size, self.position, self.seg_size, self.roimean, self.context)
        if min(weights) < 0 or max(weights) <= 0:
            raise InputError(f"retrieval: weights must be >= 0 and not all 0, got {weights}")
        if self.heads not in ("network", "refit"):
            raise InputError(f"retrieval.heads: expected network or refit, got {self.heads!r}")
        if self.position_frame not in POSITION_FRAMES:
            raise InputError(f"retrieval.position_frame: expected head, template or atlas, got {self.position_frame!r}")
        if not self.task_temperature > 0:
            raise InputError(f"retrieval.task_temperature: expected a number > 0, got {self.task_temperature!r}")
        if self.size_units not in SIZE_UNITS:
            raise InputError(f"retrieval.size_units: expected log or mm, got {self.size_units!r}")
        if isinstance(self.head_draws, bool) or not isinstance(self.head_draws, int) or self.head_draws < 0:
            raise InputError(f"retrieval.head_draws: expected a whole number >= 0, got {self.head_draws!r}")
        if self.size_source not in SIZE_SOURCES:
            raise InputError(f"retrieval.size_source: expected box, seg or fit, got {self.size_source!r}")
        if self.head_select not in HEAD_SELECT:
            raise InputError(f"retrieval.head_select: expected {', '.join(HEAD_SELECT)}, got {self.head_select!r}")
        check_warp_mm(self.warp_mm, "retrieval.warp_mm")
        if not isinstance(self.frame_skips_tumors, bool):
            raise InputError(f"retrieval.frame_skips_tumors: expected true or false, got {self.frame_skips_tumors!r}")
        if not isinstance(self.scan_count, bool):
            raise InputError(f"retrieval.scan_count: expected true or false, got {self.scan_count!r}")
        if isinstance(self.count_weight, bool) or not isinstance(self.count_weight, int | float) or not (
                self.count_weight > 0):
            raise InputError(f"retrieval.count_weight: expected a number > 0, got {self.count_weight!r}")
        if self.count_weight != 1 and not self.scan_count:
            raise InputError(f"retrieval.count_weight: {self.count_weight!r} weighs the scan's tumor count, which the "
                             "heads read only with retrieval.scan_count: true")
        if not isinstance(self.mirror, bool):
            raise InputError(f"retrieval.mirror: expected true or false, got {self.mirror!r}")
        if not isinstance(self.refine_box, bool):
            raise InputError(f"retrieval.refine_box: expected true or false, got {self.refine_box!r}")
        if isinstance(self.drawn_size, bool) or not isinstance(self.drawn_size, int | float) or not (
                0 <= self.drawn_size <= 1):
            raise InputError(f"retrieval.drawn_size: expected a weight from 0 to 1, got {self.drawn_size!r}")
        if self.drawn_read not in DRAWN_READS:
            raise InputError(f"retrieval.drawn_read: expected {' or '.join(DRAWN_READS)}, got {self.drawn_read!r}")
        if isinstance(self.rerank, bool) or not isinstance(self.rerank, int) or self.rerank < 0:
            raise InputError(f"retrieval.rerank: expected a whole number >= 0 (candidates), got {self.rerank!r}")
        for key in ("size", "position"):
            w = getattr(self, f"rerank_{key}")
            if w is not None and not (isinstance(w, int | float) and not isinstance(w, bool) and w >= 0):
                raise InputError(f"retrieval.rerank_{key}: expected a weight >= 0, got {w!r}")
            if w is not None and w != getattr(self, key) and getattr(self, key) == 0:
                raise InputError(f"retrieval.rerank_{key}: the vector has no {key} part to weigh again "
                                 f"(retrieval.{key} is 0)")

    @property
    def uses_position(self) -> bool:
        """Whether the vector reads the box's place (the position part, or the refit heads)."""
        return self.position > 0 or (self.tasks > 0 and self.heads == "refit")

    @property
    def position_key(self) -> str:
        """The part the recipe's position is read from."""
        return POSITION_FRAMES[self.position_frame]

    @property
    def size_key(self) -> str:
        """The part the recipe's `size` weight reads (its source, in its units)."""
        return size_key(SIZE_SOURCES[self.size_source], self.size_units)

    @property
    def needs_frame(self) -> bool:
        """Whether embedding needs the scan's registration onto the template (tumornet.register)."""
        return self.uses_position and self.position_frame != "head"

    @property
    def needs_stats(self) -> bool:
        return (self.standardize or self.whiten or self.size > 0 or self.position > 0 or self.seg_size > 0
                or self.roimean > 0 or self.context > 0 or (self.tasks > 0 and self.heads == "refit"))
