"""What a box drawn around a tumor says of its size (a search by box, the robustness evaluation's distorted
boxes): the box's own extent, the span of the tumor the segmentation head sees in it (tumor_span;
retrieval.drawn_size, twentieth round), or the tumor's extent that a regression fit at export on the training
tumors' boxes reads from the segmentation's probability profile in it (span_profile, fit_drawn_size;
retrieval.drawn_read: fit, twenty-fifth round). Plain numpy: tumornet.descriptor reads the profile from the
network's patch and composes the vector.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from .errors import InputError

SPAN_LEVEL = 0.3  # tumor_span: the run of the probability profile above this share of its peak ...
SPAN_PEAK = 0.2  # ... where the peak inside the box reaches this (twentieth round, on validation); below it the
# segmentation saw nothing in the box and a drawn box keeps its own extent (both reads)
# span_profile's layout per axis: the tumor probability's peak in the box, the widths (voxels) of the profile's
# runs at DRAWN_FIT_LEVELS of that peak, the profile at the box's two end faces and one voxel outside each
# (shares of the peak). tumor_span is its width at SPAN_LEVEL; fit_drawn_size reads it all (twenty-fifth round)
DRAWN_FIT_LEVELS = (0.1, 0.2, SPAN_LEVEL, 0.5, 0.7)
PROFILE_WIDTH = 1 + len(DRAWN_FIT_LEVELS) + 4
DRAWN_FIT_CLIP = (-1.5, 0.7)  # a fitted log ratio is held to this: a box read at 0.22x to 2x its extent per axis


def _run_width(profile: np.ndarray, lo: int, hi: int, level: float) -> float:
    """Width (voxels) of the run of `profile` at or above `level` that holds its highest point within
    [lo, hi): between the level's crossings, interpolated linearly between voxel centres (a run that
    reaches an end of the profile: that voxel's outer edge)."""
    i = lo + int(np.argmax(profile[lo:hi]))
    a = b = i
    while a > 0 and profile[a - 1] >= level:
        a -= 1
    while b < len(profile) - 1 and profile[b + 1] >= level:
        b += 1
    left = a - 0.5 if a == 0 else a - (profile[a] - level) / max(profile[a] - profile[a - 1], 1e-6)
    right = b + 0.5 if b == len(profile) - 1 else b + (profile[b] - level) / max(profile[b] - profile[b + 1], 1e-6)
    return float(right - left)


def span_profile(prob: np.ndarray, box) -> np.ndarray:
    """Per axis, what the tumor probability (`prob`, a patch around the box; `box` in its voxels) maximized
    over the box's cross section says of where the tumor ends in the box -> (3, PROFILE_WIDTH): [the peak in
    the box, the widths (voxels) of the profile's runs at DRAWN_FIT_LEVELS of it that hold its highest point
    in the box, measured over the whole patch, the profile at the box's first and last slice and at the
    slice outside each (the patch's edge where the box reaches it), as shares of the peak]."""
    lo, hi = np.asarray(box[:3], int), np.asarray(box[3:], int)
    inside = prob[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    peak = float(inside.max()) if inside.size else 0.0
    out = np.zeros((3, PROFILE_WIDTH))
    out[:, 0] = peak
    if peak <= 0:
        return out
    for a in range(3):
        cut = tuple(slice(None) if j == a else slice(lo[j], hi[j]) for j in range(3))
        profile = prob[cut].max(axis=tuple(j for j in range(3) if j != a))
        share = profile / peak
        last = len(profile) - 1
        out[a, 1:] = [*(_run_width(profile, lo[a], hi[a], level * peak) for level in DRAWN_FIT_LEVELS),
                      share[lo[a]], share[hi[a] - 1], share[max(lo[a] - 1, 0)], share[min(hi[a], last)]]
    return out


def span_of(profile: np.ndarray) -> np.ndarray:
    """tumor_span from a box's span_profile: the width at SPAN_LEVEL per axis, NaN (3,) where the peak is
    under SPAN_PEAK (nothing seen)."""
    if profile[0, 0] < SPAN_PEAK:
        return np.full(3, np.nan)
    return profile[:, 1 + DRAWN_FIT_LEVELS.index(SPAN_LEVEL)].copy()


def tumor_span(prob: np.ndarray, box) -> np.ndarray:
    """Per axis, how far the tumor the segmentation head sees in a box spans (voxels): the run of the
    probability profile (span_profile's) above SPAN_LEVEL of its peak in the box that holds the peak; NaN
    (3,) where the peak is under SPAN_PEAK."""
    return span_of(span_profile(prob, box))


def drawn_extent(extent, span, weight: float) -> np.ndarray:
    """A drawn box's extent per axis, blended in log with `weight` toward the tumor's span inside it
    (retrieval.drawn_size; tumor_span, capped at the box: a box that is too loose reads smaller, one
    that is too tight does not grow); the box's own where the segmentation saw nothing."""
    extent, span = np.asarray(extent, float), np.asarray(span, float)
    if weight == 0 or not np.isfinite(span).all():
        return extent
    return extent ** (1 - weight) * np.minimum(np.maximum(span, 1e-3), extent) ** weight


def fitted_extent(extent, profile, fit: Mapping, weight: float) -> np.ndarray:
    """A drawn box's extent per axis moved in log with `weight` toward the tumor's extent that the training
    tumors' regression reads from the box's span profile (retrieval.drawn_read: fit;
    drawn_log_ratio: a loose box reads smaller, a tight one larger; the box's own where nothing is seen)."""
    extent = np.asarray(extent, float)
    return extent * np.exp(weight * drawn_log_ratio(fit, profile, extent))


def with_drawn_size(parts: Mapping, weight: float, spacing_mm, fit: Mapping | None = None) -> dict:
    """One box's parts (tumors_parts) with `box_log_volume` read from drawn_extent (a drawn box), or with
    `fit` (drawn_fit_of: the recipe's drawn_read is fit) from fitted_extent."""
    if fit is not None:
        extent = fitted_extent(parts["extent"], parts["span_profile"], fit, weight)
    else:
        extent = drawn_extent(parts["extent"], parts["tumor_span"], weight)
    return {**parts, "box_log_volume": box_log_volume(extent, spacing_mm)}


def box_log_volume(extent, spacing_mm) -> float:
    """The `box_log_volume` part: log of a box's volume in ml from its extent per axis in voxels."""
    voxel_ml = float(np.prod(np.broadcast_to(np.asarray(spacing_mm, float), 3))) / 1000.0
    return float(np.log(max(float(np.prod(extent)) * voxel_ml, 1e-6)))


def drawn_design(profiles, extents) -> tuple[np.ndarray, np.ndarray]:
    """Boxes' span profiles (n, 3, PROFILE_WIDTH) and drawn extents (n, 3; voxels) -> the regression's inputs
    per box and axis (n * 3, 8): the log of each run's width over the extent (the width held to 0.5 voxel ..
    3x the extent), the mean and the larger of the two end faces, the mean of the two voxels outside; and
    (n * 3,) whether the segmentation saw the tumor in the box (its peak >= SPAN_PEAK)."""
    f = np.asarray(profiles, dtype=np.float64).reshape(-1, PROFILE_WIDTH)
    e = np.maximum(np.asarray(extents, dtype=np.float64).reshape(-1), 1e-3)
    n = len(DRAWN_FIT_LEVELS)
    widths = np.clip(np.nan_to_num(f[:, 1:1 + n], nan=0.0), 0.5, 3.0 * e[:, None])
    faces, outside = f[:, 1 + n:3 + n], f[:, 3 + n:5 + n]
    x = np.hstack([np.log(widths / e[:, None]), faces.mean(1, keepdims=True), faces.max(1, keepdims=True),
                   outside.mean(1, keepdims=True)])
    return np.nan_to_num(x), f[:, 0] >= SPAN_PEAK


def fit_drawn_size(profiles, extents, true_extents, *, min_boxes: int = 20) -> dict:
    """How far a drawn box's extent is from its tumor's, per axis, learned from the training tumors' boxes
    (`retrieval.drawn_read: fit`, twenty-fifth round): a ridge regression (penalty by leave-one-out over
    the box axes) of log(true extent / drawn extent) on drawn_design's inputs, over the axes where the
    segmentation saw the tumor; boxes drawn exactly and as the paper's eq. 2 draws them (the refit heads'
    rough copies, retrieval.head_draws), so that a box is read neither larger nor smaller on average ->
    {"drawn_fit": plain lists for the model file}, or {} where fewer than `min_boxes` axes were seen."""
    from sklearn.linear_model import RidgeCV

    x, seen = drawn_design(profiles, extents)
    y = np.log(np.maximum(np.asarray(true_extents, float).reshape(-1), 1e-3)
               / np.maximum(np.asarray(extents, float).reshape(-1), 1e-3))
    if seen.sum() < min_boxes:
        return {}
    ridge = RidgeCV(alphas=np.logspace(-3, 3, 13)).fit(x[seen], y[seen])
    resid = y[seen] - ridge.predict(x[seen])
    return {"drawn_fit": {"coef": ridge.coef_.tolist(), "intercept": float(ridge.intercept_),
                          "alpha": float(ridge.alpha_), "axes": int(seen.sum()), "resid_sd": float(resid.std())}}


def drawn_log_ratio(fit: Mapping, profile, extent) -> np.ndarray:
    """fit_drawn_size's regression on one box: its profile (3, PROFILE_WIDTH) and extent (3,) -> the log
    ratio of the tumor's extent to the box's per axis (3,), held to DRAWN_FIT_CLIP; 0 where the
    segmentation saw nothing in the box."""
    x, seen = drawn_design(np.asarray(profile)[None], np.asarray(extent)[None])
    pred = np.clip(x @ np.asarray(fit["coef"], dtype=np.float64) + float(fit["intercept"]), *DRAWN_FIT_CLIP)
    return np.where(seen, pred, 0.0)


def drawn_fit_of(cfg, stats: Mapping | None, where: str) -> Mapping | None:
    """The drawn-box size regression a recipe reads (`retrieval.drawn_read: fit`; None for `span`), refused,
    naming `where`, where the model file has none."""
    if cfg.drawn_read != "fit" or not cfg.drawn_size:
        return None
    if "drawn_fit" not in (stats or {}):
        raise InputError(f"{where}: retrieval.drawn_read: fit needs the drawn-box size regression fit on the "
                         "training tumors' boxes, which the model file has none of (exported before it existed, or "
                         "without retrieval.head_draws): ray_job.py retune --manifest with the same recipe, or "
                         "drawn_read: span")
    return stats["drawn_fit"]
