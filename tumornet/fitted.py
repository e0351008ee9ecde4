"""What the retrieval vector learns from the training tumors at export (tumornet.descriptor composes
it): the parts' statistics (`fit_stats`: mean and sd, the RoiPool whitening), the tumor's size fit on
the training masks (`fit_size`, `retrieval.size_source: fit`) and the task heads refit on the parts
(`fit_heads`, `retrieval.heads: refit`). All plain lists, stored in the model file, so that embed,
search and evaluate apply the same vector; `recipe-grid` fits them again from the shards.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from .errors import InputError
from .labels import LabelSchema

# frame -> the position part it reads; "atlas" reads the template's, and its refit heads also read `atlas`
POSITION_FRAMES = {"head": "position", "template": "template_position", "atlas": "template_position"}
# what the `size` and `seg_size` parts read: the log volume (ml), or its equivalent-sphere diameter (mm,
# with_diameters: box_log_volume -> box_diameter_mm)
SIZE_UNITS = ("log", "mm")
# size source -> the log volume (ml) that the `size` part and the refit heads' size input read: the box's,
# the segmented one, or one fit at export on the training tumors' masks (fit_size)
SIZE_SOURCES = {"box": "box_log_volume", "seg": "seg_log_volume", "fit": "fit_log_volume"}
SIZE_FIT_INPUTS = ("box_log_volume", "seg_log_volume", "roipool")  # what fit_size reads, z-scored
# the sd of a box's log volume under the paper's distortion (eq. 2: per axis log2 scale ~ N(0, 1/3)):
# fit_size also learns from the training tumors with their box volumes drawn that far off
ROUGH_BOX_LOG_SD = float(np.log(2.0) * np.sqrt(3.0) / 3.0)


STANDARDIZED = ("roipool", "box_log_volume", "position", "template_position", "atlas", "seg_log_volume", "roimean",
                "context", "box_diameter_mm", "seg_diameter_mm", "scan_log_tumors")


def size_key(log_key: str, units: str) -> str:
    """A log volume part's key in `units` (box_log_volume, mm -> box_diameter_mm)."""
    return log_key if units == "log" else log_key.replace("_log_volume", "_diameter_mm")


def diameter_mm(log_volume_ml) -> np.ndarray:
    """The equivalent-sphere diameter (mm) of a log volume (ml)."""
    return (6.0 / np.pi * 1000.0 * np.exp(np.asarray(log_volume_ml, dtype=np.float64))) ** (1 / 3)


def with_diameters(parts: Mapping) -> dict:
    """The parts with the equivalent-sphere diameters (mm) of their log volumes (ml) added: the
    `size_units: mm` parts, derived, never stored."""
    out = dict(parts)
    for log_key in SIZE_SOURCES.values():
        if log_key in parts:
            out[size_key(log_key, "mm")] = diameter_mm(parts[log_key])
    return out


WHITEN_SHRINK = 0.1  # eigenvalues + this x their mean before whitening: few tumors, many channels


def _mean_sd(a: np.ndarray) -> dict:
    """Per column (n, d) -> {"mean", "sd"} as plain lists (sd 1 where a column is constant), over the rows
    where it is known (NaN: a scan's tumor count not known, tumornet.descriptor; a column never known:
    mean 0, sd 1)."""
    a = a.reshape(len(a), -1)
    known = np.isfinite(a)
    if known.all():
        mean, sd = a.mean(0), a.std(0)  # bit for bit what models exported before stored
    else:
        n = np.maximum(known.sum(0), 1)
        mean = np.where(known, a, 0.0).sum(0) / n
        sd = np.sqrt((np.where(known, a - mean, 0.0) ** 2).sum(0) / n)
    return {"mean": mean.tolist(), "sd": np.where(sd > 1e-8, sd, 1.0).tolist()}


def fit_stats(parts: Sequence[Mapping]) -> dict:
    """Mean and sd of the standardized parts over training tumors (plain lists: stored in the model file)."""
    if len(parts) < 2:
        raise InputError(f"retrieval statistics need at least 2 training tumors, got {len(parts)}")

    out = {}
    parts = [with_diameters(p) for p in parts]
    for key in (k for k in STANDARDIZED if k in parts[0]):
        out[key] = _mean_sd(np.array([np.atleast_1d(p[key]) for p in parts], dtype=np.float64))
    z = _z({"roipool": [p["roipool"] for p in parts]}, "roipool", out)
    lam, vec = np.linalg.eigh(np.cov(z, rowvar=False).reshape(z.shape[1], z.shape[1]))
    lam = np.clip(lam, 0.0, None)
    # z @ whiten has (about) unit covariance: two random tumors differ by about 2C, as z-scores do
    out["roipool"]["whiten"] = (vec / np.sqrt(lam + WHITEN_SHRINK * max(lam.mean(), 1e-12))).tolist()
    out["tumors"] = len(parts)
    return out


def fit_size(parts: Mapping[str, np.ndarray], size_mm: np.ndarray, stats: Mapping, *, seed: int = 0) -> dict:
    """The tumor's log volume (ml) learned from the training tumors' masks (`size_mm`: their
    equivalent-sphere diameters): a ridge regression on the z-scored box log volume, segmented log
    volume and RoiPool vector (SIZE_FIT_INPUTS), fit on the tumors as boxed and once more with their box
    volumes drawn as far off as a rough box puts them (the paper's eq. 2, ROUGH_BOX_LOG_SD), so that it
    leans on what a rough box changes little; the penalty chosen by 5-fold cross-validation over tumors
    (a tumor's two rows in one fold) -> plain lists for the model file: {"size_fit": the regression,
    "fit_log_volume" / "fit_diameter_mm": the fitted part's mean and sd over the training tumors}, to
    merge into the statistics."""
    from sklearn.linear_model import Ridge

    x = np.concatenate([_z(parts, k, stats) for k in SIZE_FIT_INPUTS], axis=1)
    d = np.asarray(size_mm, dtype=np.float64)
    if len(d) != len(x) or not (np.isfinite(d) & (d > 0)).all():
        raise InputError(f"retrieval.size_source: fit: {len(x)} training tumors but {len(d)} sizes, or a size that "
                         "is not a positive number")
    y = np.log(np.pi / 6.0 * d ** 3 / 1000.0)
    rng = np.random.default_rng(seed)
    rough = x.copy()
    rough[:, 0] += rng.normal(0.0, ROUGH_BOX_LOG_SD, len(x)) / stats["box_log_volume"]["sd"][0]
    folds = rng.permutation(len(x)) % min(5, len(x))

    def fit(alpha: float, rows: np.ndarray) -> Ridge:
        return Ridge(alpha=alpha).fit(np.concatenate([x[rows], rough[rows]]), np.concatenate([y[rows], y[rows]]))

    def cv_error(alpha: float) -> float:
        err = [fit(alpha, folds != f).predict(np.concatenate([x[folds == f], rough[folds == f]]))
               - np.concatenate([y[folds == f], y[folds == f]]) for f in np.unique(folds)]
        return float(np.mean(np.concatenate(err) ** 2))

    alpha = min(np.logspace(-2, 3, 11), key=cv_error) if len(x) >= 5 else 1.0
    ridge = fit(alpha, np.ones(len(x), bool))
    pred = x @ ridge.coef_ + ridge.intercept_
    return {"size_fit": {"inputs": list(SIZE_FIT_INPUTS), "coef": ridge.coef_.tolist(),
                         "intercept": float(ridge.intercept_), "alpha": float(alpha)},
            "fit_log_volume": _mean_sd(pred), "fit_diameter_mm": _mean_sd(diameter_mm(pred))}


def with_fitted_size(parts: Mapping, stats: Mapping | None) -> dict:
    """The parts with `fit_log_volume` (fit_size's regression in the statistics) added."""
    if "fit_log_volume" in parts:
        return dict(parts)
    if not stats or "size_fit" not in stats:
        raise InputError("retrieval.size_source: fit needs the size regression fit on the training tumors, and the "
                         "model file has none (exported before it existed): train again, or use size_source: box")
    fit = stats["size_fit"]
    x = np.concatenate([_z(parts, k, stats) for k in fit["inputs"]], axis=1)
    return {**parts, "fit_log_volume": x @ np.asarray(fit["coef"]) + fit["intercept"]}


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


HEAD_INPUTS = ("roipool", "position", "box_log_volume")  # what the refit heads read, z-scored (position:
# the part of the recipe's position_frame, head_inputs)


def head_inputs(position_frame: str = "head", size_source: str = "box", scan_count: bool = False) -> tuple[str, ...]:
    """The parts the refit heads read, with the position of `position_frame` (and, for "atlas", what the
    atlas says of the box in template space), the size of `size_source` and, with `scan_count`, the log of
    the number of tumors in the scan (`scan_log_tumors`)."""
    swap = {"position": POSITION_FRAMES[position_frame], "box_log_volume": SIZE_SOURCES[size_source]}
    inputs = tuple(swap.get(k, k) for k in HEAD_INPUTS)
    inputs = (*inputs, "atlas") if position_frame == "atlas" else inputs
    return (*inputs, "scan_log_tumors") if scan_count else inputs


def _z(parts: Mapping, key: str, stats: Mapping) -> np.ndarray:
    if key == "scan_log_tumors" and key not in parts:
        raise InputError("retrieval.scan_count: these tumors carry no count of their scan's tumors (shards "
                         "embedded before `scan_tumors` existed): embed the archive again")
    if key not in stats:
        raise InputError(f"retrieval: the model file has no training statistics of `{key}` (exported before "
                         "that part existed); train again, or score with statistics from the shards")
    a = np.asarray(parts[key], dtype=np.float64).reshape(len(parts["roipool"]), -1)
    return (a - np.asarray(stats[key]["mean"])) / np.asarray(stats[key]["sd"])


def count_weighted(stats: Mapping, weight: float) -> Mapping:
    """The statistics with the count's z-score (`scan_log_tumors`) multiplied by `weight` wherever a head
    reads it (retrieval.count_weight: an L2-penalized head then pulls the count's coefficient weight^2
    times less toward 0 than the other inputs')."""
    if weight == 1.0 or "scan_log_tumors" not in stats:
        return stats
    sd = stats["scan_log_tumors"]
    return {**stats, "scan_log_tumors": {**sd, "sd": [v / weight for v in sd["sd"]]}}


def _inputs_x(parts: Mapping, inputs: Sequence[str], stats: Mapping) -> np.ndarray:
    """A head's input rows: the z-scored parts it reads, side by side."""
    return np.concatenate([_z(parts, k, stats) for k in inputs], axis=1)


HEAD_SELECT = ("fixed", "cv", "cv-context")  # retrieval.head_select: every head reads head_inputs with C = 1,
# or per task the inputs and C that predict its held-out folds best (select_head); "cv-context": the same
# with one more input set to choose from, everything plus the feature map around the box (`context`)
HEAD_CS = (0.1, 1.0, 10.0, 100.0)


def head_input_sets(position_frame: str = "head", size_source: str = "box", *, context: bool = False,
                    scan_count: bool = False) -> dict[str, tuple[str, ...]]:
    """What a head selected by cross-validation may read: everything (head_inputs), the box's place and
    size without the RoiPool vector, or its place alone (a location label is a side of the template's
    midline or centre: the RoiPool vector's 32-128 numbers only add noise to three coordinates); with
    `context` also everything plus the feature map's mean over a shell around the box (what surrounds
    the tumor on the scan itself: skull and dura or brain, whatever the template says). With `scan_count`
    the first two (and `context`) also read how many tumors the scan holds."""
    inputs = head_inputs(position_frame, size_source, scan_count)
    sets = {"all": inputs, "place": tuple(k for k in inputs if k != "roipool"),
            "position": (POSITION_FRAMES[position_frame],)}
    return {**sets, "context": (*inputs, "context")} if context else sets


def _logistic(x: np.ndarray, y: np.ndarray, c: float):
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=c, max_iter=5000).fit(x, y)


def select_head(xs: Mapping[str, np.ndarray], y: np.ndarray, groups: np.ndarray, n_classes: int, *,
                cs: Sequence[float] = HEAD_CS, folds: int = 5) -> tuple[str, float]:
    """The input set (a key of xs: its rows, the tumors that have the label) and inverse L2 strength C
    whose logistic regression gives the lowest log-loss on held-out folds of patients (`groups`: a
    patient's tumors, and their rough-box copies, in one fold) -> (set, C); ties keep the earlier set
    and the smaller C."""
    from sklearn.model_selection import GroupKFold

    n_folds = min(folds, len(set(groups.tolist())))
    if n_folds < 2:
        return next(iter(xs)), 1.0
    splits = list(GroupKFold(n_folds).split(y, y, groups))
    best = None
    for name, x in xs.items():
        for c in cs:
            loss = []
            for train, held in splits:
                classes = np.unique(y[train])
                p = np.full((len(held), n_classes), 1e-6)
                if len(classes) < 2:
                    p[:, classes] = 1.0
                else:
                    p[:, classes] = np.clip(_logistic(x[train], y[train], c).predict_proba(x[held]), 1e-6, 1.0)
                loss.append(-np.log(p[np.arange(len(held)), y[held]]))
            loss = float(np.mean(np.concatenate(loss)))
            if best is None or loss < best[0] - 1e-12:
                best = (loss, name, float(c))
    return best[1], best[2]


def fit_heads(parts: Mapping[str, np.ndarray], labels: Mapping[str, np.ndarray], schema: LabelSchema,
              stats: Mapping, *, c: float = 1.0, position_frame: str = "head", size_source: str = "box",
              select: str = "fixed", groups: np.ndarray | None = None, scan_count: bool = False,
              count_weight: float = 1.0) -> dict:
    """Task heads refit on training tumors: per task, a multinomial logistic regression (L2, inverse
    strength `c`) on the z-scored RoiPool vector, position and box log volume (HEAD_INPUTS) of the
    tumors that have that label -> plain lists for the model file ({task: {classes, coef, intercept,
    inputs, c}}; a task with one class seen predicts it; with none, uniform; "position_frame" /
    "size_source": the position and the size they read). The network's own heads read the RoiPool
    vector alone, so they must infer where the box is from its content; these see it. `select: cv`:
    per task, the inputs (head_input_sets) and C chosen by cross-validation over patients (`groups`,
    one per row; None: every row its own patient) instead (select_head). `scan_count`: the heads also
    read the log of the number of tumors in each tumor's scan (head_inputs), its z-score multiplied by
    `count_weight` (count_weighted)."""
    if select not in HEAD_SELECT:
        raise InputError(f"retrieval.head_select: expected {', '.join(HEAD_SELECT)}, got {select!r}")
    sets = head_input_sets(position_frame, size_source, context=select == "cv-context", scan_count=scan_count)
    if size_source == "fit":
        parts = with_fitted_size(parts, stats)
    weighted = count_weighted(stats, count_weight) if scan_count else stats
    x_of = {name: _inputs_x(parts, inputs, weighted) for name, inputs in sets.items()}
    n = len(x_of["all"])
    groups = np.arange(n) if groups is None else np.asarray(groups)
    if len(groups) != n:
        raise InputError(f"fit_heads: {n} tumors but {len(groups)} patient groups")
    out: dict = {"position_frame": position_frame, "size_source": size_source, "select": select,
                 "scan_count": scan_count, "count_weight": float(count_weight) if scan_count else 1.0}
    for t in schema.tasks:
        y = np.asarray(labels[t.name])
        known = y >= 0
        classes = sorted({int(v) for v in y[known]})
        name, c_t = "all", c
        if select != "fixed" and len(classes) >= 2:
            name, c_t = select_head({k: v[known] for k, v in x_of.items()}, y[known], groups[known], t.n_classes)
        x = x_of[name]
        if len(classes) < 2:
            coef, intercept = np.zeros((len(classes), x.shape[1])), np.zeros(len(classes))
        else:
            clf = _logistic(x[known], y[known], c_t)
            coef, intercept = clf.coef_, clf.intercept_
            if len(classes) == 2:  # sklearn's binary form: one row for class 1 -> a row per class
                coef, intercept = np.stack([-coef[0] / 2, coef[0] / 2]), np.array([-intercept[0] / 2, intercept[0] / 2])
        out[t.name] = {"classes": classes, "coef": np.asarray(coef).tolist(),
                       "intercept": np.asarray(intercept).tolist(), "inputs": list(sets[name]), "c": float(c_t)}
    return out


def _value(v) -> str:
    """A recipe value as the config writes it (true, 10, cv)."""
    return str(v).lower() if isinstance(v, bool) else f"{v:g}" if isinstance(v, int | float) else str(v)


def refit_probabilities(parts: Mapping[str, np.ndarray], schema: LabelSchema, stats: Mapping, *,
                        position_frame: str = "head", size_source: str = "box", select: str = "fixed",
                        temperature: float = 1.0, scan_count: bool = False,
                        count_weight: float = 1.0) -> list[np.ndarray]:
    """Each task's class probabilities (n, n_classes) from the refit heads in `stats["heads"]`. With
    `scan_count`, a tumor whose scan's count is unknown (`scan_log_tumors` NaN: a drawn box without a
    given count, or a tumor found without a mask) reads the heads fit without the count instead
    (`stats["heads_uncounted"]`, fit beside them at export: nineteenth round)."""
    if scan_count and "scan_log_tumors" in parts:
        unknown = np.isnan(np.asarray(parts["scan_log_tumors"], dtype=np.float64).reshape(-1))
        if unknown.any():
            return _uncounted_too(parts, unknown, schema, stats, position_frame=position_frame,
                                  size_source=size_source, select=select, temperature=temperature,
                                  count_weight=count_weight)
    if "heads" not in stats:
        raise InputError("retrieval.heads: refit needs the heads refit on the training tumors, and the model file "
                         "has none (exported before they existed): train again, or use heads: network")
    fitted = stats["heads"].get("position_frame", "head")  # heads exported before frames read the head's
    if fitted != position_frame:
        raise InputError(f"retrieval.position_frame: {position_frame}, but the refit heads read the {fitted} "
                         "position (fit for another recipe): train again, or ray_job.py retune --manifest with this "
                         "recipe")
    fitted = stats["heads"].get("size_source", "box")  # heads exported before size sources read the box's
    if fitted != size_source:
        raise InputError(f"retrieval.size_source: {size_source}, but the refit heads read the {fitted} size "
                         "(fit for another recipe): train again, or ray_job.py retune --manifest with this recipe")
    # (recipe key, the heads' key, the recipe's value, what heads exported before the key existed were fit with)
    for key, head_key, wanted, before in (("head_select", "select", select, "fixed"),
                                          ("scan_count", "scan_count", scan_count, False),
                                          ("count_weight", "count_weight", count_weight if scan_count else 1.0, 1.0)):
        fitted = stats["heads"].get(head_key, before)
        if fitted != wanted:
            raise InputError(f"retrieval.{key}: {_value(wanted)}, but the refit heads were fit with {key}: "
                             f"{_value(fitted)} (for another recipe): train again, or ray_job.py retune --manifest "
                             "with this recipe")
    if size_source == "fit":
        parts = with_fitted_size(parts, stats)
    if scan_count:
        stats = count_weighted(stats, count_weight)
    every = head_inputs(position_frame, size_source)  # heads exported before head_select read them all
    x_of: dict[tuple[str, ...], np.ndarray] = {}
    out = []
    for t in schema.tasks:
        h = stats["heads"][t.name]
        inputs = tuple(h.get("inputs", every))
        if inputs not in x_of:
            x_of[inputs] = _inputs_x(parts, inputs, stats)
        x = x_of[inputs]
        p = np.full((len(x), t.n_classes), 1.0 / t.n_classes)
        if h["classes"]:
            p[:] = 0.0
            p[:, h["classes"]] = _softmax((x @ np.asarray(h["coef"]).T + np.asarray(h["intercept"])) / temperature)
        out.append(p)
    return out


def _uncounted_too(parts: Mapping[str, np.ndarray], unknown: np.ndarray, schema: LabelSchema, stats: Mapping, *,
                   count_weight: float, **recipe) -> list[np.ndarray]:
    """refit_probabilities of tumors of which some (`unknown`) have no count of their scan's tumors: those
    from the heads fit without it, the others from the counted heads."""
    require_uncounted(stats, "retrieval.scan_count")
    out = [np.empty((len(unknown), t.n_classes)) for t in schema.tasks]
    for flag in (False, True):
        rows = np.flatnonzero(unknown == flag)
        if len(rows) == 0:
            continue
        subset = {k: np.asarray(v)[rows] for k, v in parts.items() if not (flag and k == "scan_log_tumors")}
        probs = (refit_probabilities(subset, schema, {**stats, "heads": stats["heads_uncounted"]}, **recipe) if flag
                 else refit_probabilities(subset, schema, stats, scan_count=True, count_weight=count_weight, **recipe))
        for p, q in zip(out, probs, strict=True):
            p[rows] = q
    return out


def require_uncounted(stats: Mapping | None, where: str) -> None:
    """Refuse, naming `where`, a model whose statistics lack the heads fit without the scan's tumor count
    (needed wherever the count is unknown: a drawn box without --scan-tumors, a tumor found without a mask)."""
    if "heads_uncounted" not in (stats or {}):
        raise InputError(f"{where}: a tumor whose scan's tumor count is unknown (a drawn box without --scan-tumors, "
                         "or a tumor found without a mask) needs the heads fit without the count "
                         "(retrieval.scan_count), which the model file has none of (exported before they existed): "
                         "ray_job.py retune --manifest with the same recipe, or give the count (search --scan-tumors)")
