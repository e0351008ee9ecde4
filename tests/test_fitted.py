"""What the retrieval vector learns at export (tumornet.fitted): the size fit on the training masks
(`retrieval.size_source`) and refit heads fit on rough-box copies (`retrieval.head_draws`)."""

import json

import numpy as np
import pytest
from test_descriptor import _keeps_older_fingerprints, _model, _parts, _stack
from test_recipe_grid import _grid_takes

from tumornet.descriptor import compose, predicted_classes
from tumornet.errors import InputError
from tumornet.fitted import HEAD_INPUTS, fit_heads, fit_stats, refit_probabilities, require_uncounted
from tumornet.labels import DEFAULT_SCHEMA
from tumornet.manifest import read_manifest
from tumornet.recipe import RetrievalConfig
from tumornet.scans import load_scan


def _sized_parts(n: int, seed: int = 0):
    """Parts whose true size the segmented volume tells well and the box less well (a rough box)."""
    rng = np.random.default_rng(seed)
    size_mm = rng.uniform(6, 35, n)
    log_v = np.log(np.pi / 6 * size_mm ** 3 / 1000)
    parts = {"roipool": rng.normal(size=(n, 8)), "position": rng.uniform(-1, 1, (n, 3)),
             "box_log_volume": log_v + np.log(6 / np.pi) + rng.normal(0, 0.15, n),
             "seg_log_volume": log_v + rng.normal(0, 0.1, n), "task_logits": rng.normal(size=(n, 20))}
    return parts, size_mm


def test_fit_size_learns_the_size_from_box_and_segmentation():
    """size_source: fit -> the size part reads a regression of the training tumors' true log volume on
    box, segmented volume and RoiPool (fit_size, plain lists in the statistics): on new tumors it is
    nearer the truth than either volume alone, leans on the segmented volume (a rough box moves the
    box's volume), and is z-scored like the other parts; in mm it is the fitted diameter."""
    from tumornet.fitted import fit_size, with_fitted_size

    parts, size_mm = _sized_parts(200)
    stats = fit_stats([{k: v[i] for k, v in parts.items()} for i in range(200)])
    stats.update(fit_size(parts, size_mm, stats))
    assert json.loads(json.dumps(stats)) == stats
    fit = stats["size_fit"]
    assert fit["inputs"] == ["box_log_volume", "seg_log_volume", "roipool"] and len(fit["coef"]) == 10
    assert fit["coef"][1] > fit["coef"][0] > 0  # the segmented volume counts most: the box's is rough
    new, new_mm = _sized_parts(100, seed=1)
    truth = np.log(np.pi / 6 * new_mm ** 3 / 1000)
    fitted = with_fitted_size(new, stats)["fit_log_volume"]
    err = {k: np.std(v - truth - np.mean(v - truth))
           for k, v in (("fit", fitted), ("box", new["box_log_volume"]), ("seg", new["seg_log_volume"]))}
    assert err["fit"] < err["seg"] < err["box"] and abs(np.mean(fitted - truth)) < 0.05
    x = compose(new, RetrievalConfig(roipool=0.0, size=1.0, size_source="fit"), DEFAULT_SCHEMA, stats)
    z = (fitted - stats["fit_log_volume"]["mean"][0]) / stats["fit_log_volume"]["sd"][0]
    assert x.shape == (100, 1) and np.allclose(x[:, 0], z / np.sqrt(2), atol=1e-5)
    mm = compose(new, RetrievalConfig(roipool=0.0, size=1.0, size_source="fit", size_units="mm"), DEFAULT_SCHEMA,
                 stats)[:, 0] * np.sqrt(2) * stats["fit_diameter_mm"]["sd"][0] + stats["fit_diameter_mm"]["mean"][0]
    assert np.sqrt(np.mean((mm - new_mm) ** 2)) < 0.15 * new_mm.mean()
    old = {k: v for k, v in stats.items() if k != "size_fit"}  # a model file exported before
    with pytest.raises(InputError, match="size_source: fit needs the size regression"):
        compose(new, RetrievalConfig(roipool=0.0, size=1.0, size_source="fit"), DEFAULT_SCHEMA, old)
    with pytest.raises(InputError, match="size_source: fit: 200 training tumors but 3 sizes"):
        fit_size(parts, size_mm[:3], stats)
    with pytest.raises(InputError, match=r"retrieval\.size_source: expected box, seg or fit, got 'mask'"):
        RetrievalConfig(size_source="mask")


def test_refit_heads_read_the_size_of_the_recipe(tmp_path):
    """size_source seg / fit -> the refit heads read that size instead of the box's (a label only the
    segmented volume tells is learned); heads fit on one size refuse a recipe of another; a grid may
    try every source, and the default leaves the fingerprint of older archives unchanged."""
    from retrieval.experiments import read_grid
    from tumornet.fitted import fit_size

    n, names = 160, list(DEFAULT_SCHEMA.names)
    parts, size_mm = _sized_parts(n, seed=2)
    parts["box_log_volume"] = np.random.default_rng(3).normal(size=n)  # the box says nothing of the size
    labels = {t: np.full(n, -1) for t in names}
    labels["tumor_type"] = (parts["seg_log_volume"] > np.median(parts["seg_log_volume"])).astype(int)
    stats = fit_stats([{k: v[i] for k, v in parts.items()} for i in range(n)])
    stats.update(fit_size(parts, size_mm, stats))
    accuracy = {}
    for source in ("box", "seg", "fit"):
        st = {**stats, "heads": fit_heads(parts, labels, DEFAULT_SCHEMA, stats, size_source=source)}
        assert st["heads"]["size_source"] == source
        probs = refit_probabilities(parts, DEFAULT_SCHEMA, st, size_source=source)[names.index("tumor_type")]
        accuracy[source] = (probs.argmax(1) == labels["tumor_type"]).mean()
    assert accuracy["seg"] >= 0.95 and accuracy["fit"] >= 0.9 and accuracy["box"] < 0.75
    with pytest.raises(InputError, match="size_source: seg, but the refit heads read the box size"):
        compose(parts, RetrievalConfig(roipool=0.0, tasks=1.0, heads="refit", size_source="seg"), DEFAULT_SCHEMA,
                {**stats, "heads": fit_heads(parts, labels, DEFAULT_SCHEMA, stats)})
    g = tmp_path / "g.yaml"
    g.write_text("size_source: [box, seg, fit]\n")
    assert read_grid(g)["size_source"] == ("box", "seg", "fit")
    g.write_text("head_draws: [0, 2]\n")
    assert read_grid(g)["head_draws"] == (0, 2)
    g.write_text("head_draws: [0.5]\n")
    with pytest.raises(InputError, match=r"head_draws: expected a whole number >= 0, got 0\.5"):
        read_grid(g)
    _keeps_older_fingerprints("head_draws", 0, 2)
    g.write_text("size_source: [mask]\n")
    with pytest.raises(InputError, match="size_source: expected box, seg or fit, got 'mask'"):
        read_grid(g)
    _keeps_older_fingerprints("size_source", "box", "fit")


def test_export_statistics_fit_the_size_on_the_training_masks(small_cohort, tmp_path):
    """trainer.loop.retrieval_stats (what the model file stores) fits the size regression on the training
    scans' masks (the working grid's voxel count) and the heads on the recipe's size source."""
    from trainer.loop import retrieval_stats
    from tumornet.cache import prepare_scan
    from tumornet.config import load_config, with_overrides
    from tumornet.fitted import with_fitted_size

    cfg = load_config("demo")
    cfg = with_overrides(cfg, data={"spacing_mm": 4.0}, train={"patch_size": 16},
                         retrieval={"position_frame": "head", "size_source": "fit", "heads": "refit", "head_draws": 0})
    scans = [prepare_scan(rows, spacing_mm=4.0, cache_dir=tmp_path / "cache")
             for rows in list(read_manifest(small_cohort).scans().values())[:16]]
    model = _model()
    stats = retrieval_stats(model, scans, cfg)
    assert stats["heads"]["size_source"] == "fit" and stats["size_fit"]["inputs"][0] == "box_log_volume"
    # head_draws: the heads also fit on rough-box copies of every tumor (drawn with a fixed seed); the
    # statistics and the size fit from the exact boxes alone
    rough_cfg = with_overrides(cfg, retrieval={"head_draws": 2})
    rough, again = (retrieval_stats(model, scans, rough_cfg) for _ in range(2))
    assert rough == again and {k: v for k, v in rough.items() if k not in ("heads", "drawn_fit")} == {
        k: v for k, v in stats.items() if k != "heads"}
    assert "drawn_fit" not in stats and "drawn_fit" not in rough  # this untrained network sees no tumor in a box
    assert not np.allclose(rough["heads"]["tumor_type"]["coef"], stats["heads"]["tumor_type"]["coef"])
    for bad in (-1, 1.5, True):
        with pytest.raises(InputError, match=r"retrieval\.head_draws: expected a whole number >= 0"):
            RetrievalConfig(head_draws=bad)
    parts = _stack(_parts(small_cohort, model))
    truth = np.array([t.size_mm for rows in list(read_manifest(small_cohort).scans().values())[:12]
                      for t in load_scan(rows, spacing_mm=4.0).tumors])
    fitted = with_fitted_size(parts, stats)["fit_log_volume"]
    assert np.corrcoef(fitted, np.log(truth))[0, 1] > 0.8
    assert compose(parts, cfg.retrieval, DEFAULT_SCHEMA, stats).shape[0] == len(truth)


def _random_tumors(n, seed, *, channels, context=False):
    """Parts of n random tumors (RoiPool of `channels`, place, size, network logits; the context too) and
    their labels: left/right the side of the place, the others missing."""
    rng = np.random.default_rng(seed)
    parts = {"roipool": rng.normal(size=(n, channels)), "position": rng.uniform(-1, 1, (n, 3)),
             "box_log_volume": rng.normal(size=n), "task_logits": rng.normal(size=(n, 20))}
    if context:
        parts["context"] = rng.normal(size=(n, channels))
    labels = {t: np.full(n, -1) for t in DEFAULT_SCHEMA.names}
    labels["left_right"] = (parts["position"][:, 0] > 0).astype(int)
    return parts, labels


def test_head_select_cv_lets_each_head_read_what_tells_its_label(tmp_path):
    """head_select: cv -> per task the inputs and C chosen by cross-validation over patients: a label
    that is the side of the box's place is read from the place alone (the fixed heads, reading every
    part with C = 1, let 64 numbers of noise outvote it), one the RoiPool vector tells from all parts;
    the choice is stored per head (plain lists), composes only for a cv recipe, heads exported before
    (no inputs stored) compose as before, a grid may try both, and the default keeps older archives'
    fingerprints."""
    names = list(DEFAULT_SCHEMA.names)

    def cohort(n, seed):
        parts, labels = _random_tumors(n, seed, channels=64)
        labels["tumor_type"] = (parts["roipool"][:, 0] > 0).astype(int)
        return parts, labels

    parts, labels = cohort(120, 0)
    stats = fit_stats([{k: v[i] for k, v in parts.items()} for i in range(120)])
    patients = np.arange(120) // 2  # two tumors a patient
    fixed = {**stats, "heads": fit_heads(parts, labels, DEFAULT_SCHEMA, stats)}
    cv = {**stats, "heads": fit_heads(parts, labels, DEFAULT_SCHEMA, stats, select="cv", groups=patients)}
    assert json.loads(json.dumps(cv)) == cv and cv["heads"]["select"] == "cv"
    lr = cv["heads"]["left_right"]
    assert lr["inputs"] in (["position"], ["position", "box_log_volume"]) and lr["c"] >= 10
    assert "roipool" in cv["heads"]["tumor_type"]["inputs"]
    assert fixed["heads"]["left_right"]["inputs"] == ["roipool", "position", "box_log_volume"]
    new, truth = cohort(300, 1)
    acc = {}
    for name, st in (("fixed", fixed), ("cv", cv)):
        probs = refit_probabilities(new, DEFAULT_SCHEMA, st, select=name)
        acc[name] = {t: (probs[names.index(t)].argmax(1) == truth[t]).mean() for t in ("left_right", "tumor_type")}
    assert acc["cv"]["left_right"] >= 0.95 and acc["cv"]["left_right"] > acc["fixed"]["left_right"] + 0.05
    assert acc["cv"]["tumor_type"] >= max(0.75, acc["fixed"]["tumor_type"] - 0.02)
    recipe = dict(roipool=0.0, tasks=1.0, heads="refit")
    x = compose(new, RetrievalConfig(**recipe, head_select="cv"), DEFAULT_SCHEMA, cv)
    assert x.shape == (300, 20) and np.allclose(x.sum(1), 5 / np.sqrt(2), atol=1e-4)  # 5 probability blocks
    with pytest.raises(InputError, match="head_select: fixed, but the refit heads were fit with head_select: cv"):
        compose(new, RetrievalConfig(**recipe), DEFAULT_SCHEMA, cv)
    older = {**stats, "heads": {k: ({kk: vv for kk, vv in h.items() if kk not in ("inputs", "c")}
                                    if isinstance(h, dict) else h)
                                for k, h in fixed["heads"].items() if k != "select"}}
    assert np.array_equal(compose(new, RetrievalConfig(**recipe), DEFAULT_SCHEMA, older),
                          compose(new, RetrievalConfig(**recipe), DEFAULT_SCHEMA, fixed))
    with pytest.raises(InputError, match="120 tumors but 3 patient groups"):
        fit_heads(parts, labels, DEFAULT_SCHEMA, stats, select="cv", groups=np.arange(3))
    with pytest.raises(InputError, match=r"retrieval\.head_select: expected fixed, cv, cv-context, got 'auto'"):
        RetrievalConfig(head_select="auto")
    assert _grid_takes(tmp_path, "head_select", "[fixed, cv-context]", "[auto]",
                       "head_select: expected fixed, cv, cv-context, got 'auto'") == ("fixed", "cv-context")
    _keeps_older_fingerprints("head_select", "fixed", "cv")


def test_head_select_cv_context_may_read_around_the_box():
    """head_select: cv-context -> the cross-validation may also choose everything plus the feature map
    around the box: a label that only the surroundings tell (an extra-axial tumor where the template's
    atlas is wrong) is read from them, one the place tells still from the place alone; cv cannot."""
    names = list(DEFAULT_SCHEMA.names)

    def cohort(n, seed):
        parts, labels = _random_tumors(n, seed, channels=16, context=True)
        labels["tumor_type"] = (parts["context"][:, 3] > 0).astype(int)
        return parts, labels

    parts, labels = cohort(160, 0)
    stats = fit_stats([{k: v[i] for k, v in parts.items()} for i in range(160)])
    groups = np.arange(160) // 2
    heads = {m: {**stats, "heads": fit_heads(parts, labels, DEFAULT_SCHEMA, stats, select=m, groups=groups)}
             for m in ("cv", "cv-context")}
    assert heads["cv-context"]["heads"]["tumor_type"]["inputs"] == ["roipool", "position", "box_log_volume", "context"]
    assert "context" not in heads["cv-context"]["heads"]["left_right"]["inputs"]
    assert all("context" not in h["inputs"] for t, h in heads["cv"]["heads"].items() if isinstance(h, dict)
               and "inputs" in h)
    new, truth = cohort(300, 1)
    acc = {m: (refit_probabilities(new, DEFAULT_SCHEMA, st, select=m)[names.index("tumor_type")].argmax(1)
               == truth["tumor_type"]).mean() for m, st in heads.items()}
    assert acc["cv-context"] >= 0.85 and acc["cv"] < 0.65
    with pytest.raises(InputError, match="head_select: cv, but the refit heads were fit with head_select: cv-context"):
        compose(new, RetrievalConfig(tasks=1.0, heads="refit", head_select="cv"), DEFAULT_SCHEMA, heads["cv-context"])


def test_refit_heads_read_where_the_box_is():
    """Heads refit on training tumors' RoiPool + position + size (stored as plain lists): a label
    that only the position tells is learned; one class seen -> that class; no label -> uniform."""
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    n, names = 80, list(DEFAULT_SCHEMA.names)
    parts = {"roipool": rng.normal(size=(n, 8)), "position": rng.uniform(-1, 1, (n, 3)),
             "box_log_volume": rng.normal(size=n), "task_logits": rng.normal(size=(n, 20))}
    labels = {t: np.full(n, -1) for t in names}
    labels["left_right"] = (parts["position"][:, 0] > 0).astype(int)
    labels["tumor_type"] = np.where(np.arange(n) % 2 == 0, 1, -1)
    stats = fit_stats([{k: v[i] for k, v in parts.items()} for i in range(n)])
    stats["heads"] = fit_heads(parts, labels, DEFAULT_SCHEMA, stats)
    assert json.loads(json.dumps(stats)) == stats  # plain lists: the model file
    probs = refit_probabilities(parts, DEFAULT_SCHEMA, stats)
    lr = probs[names.index("left_right")]
    assert (lr.argmax(1) == labels["left_right"]).mean() >= 0.95
    x = np.concatenate([(np.asarray(parts[k], float).reshape(n, -1) - stats[k]["mean"]) / stats[k]["sd"]
                        for k in HEAD_INPUTS], axis=1)
    assert np.allclose(lr, LogisticRegression(C=1.0, max_iter=5000).fit(x, labels["left_right"]).predict_proba(x),
                       atol=1e-6)  # sklearn's binary form, as two softmax rows
    assert np.allclose(probs[names.index("tumor_type")], [0.0, 1.0, 0.0])
    assert np.allclose(probs[names.index("area")], 1 / 11)
    refit = RetrievalConfig(roipool=0.0, tasks=1.0, heads="refit")
    a, b = compose(parts, refit, DEFAULT_SCHEMA, stats), compose(parts, RetrievalConfig(roipool=0.0, tasks=1.0),
                                                                DEFAULT_SCHEMA, stats)
    assert a.shape == b.shape == (n, 20) and not np.allclose(a, b)
    # the predicted classes search prints: the refit heads' when the recipe uses them, else the network's
    pred = predicted_classes(parts, refit, DEFAULT_SCHEMA, stats)
    assert (pred["left_right"] == labels["left_right"]).mean() >= 0.95 and (pred["tumor_type"] == 1).all()
    assert all((pred[t] == p.argmax(1)).all() for t, p in zip(names, probs, strict=True))
    net = predicted_classes(parts, RetrievalConfig(roipool=0.0, tasks=1.0), DEFAULT_SCHEMA, stats)
    assert (net["left_right"] == parts["task_logits"][:, 14:16].argmax(1)).all()
    assert (net["area"] == parts["task_logits"][:, 3:14].argmax(1)).all()
    with pytest.raises(InputError, match="refit needs the heads refit on the training tumors"):
        compose(parts, refit, DEFAULT_SCHEMA, {k: v for k, v in stats.items() if k != "heads"})
    with pytest.raises(InputError, match=r"retrieval\.heads: expected network or refit, got 'mlp'"):
        RetrievalConfig(heads="mlp")


def test_scan_count_lets_the_heads_read_how_many_tumors_the_scan_holds(tmp_path):
    """retrieval.scan_count -> every head input set but the place alone also reads the log of the scan's
    tumor count: a type that several tumors in one scan tell (metastases) is learned from it, the choice is
    stored with the heads, a recipe must match it, parts without the count are refused by name, and the
    default keeps older archives' fingerprints."""
    names = list(DEFAULT_SCHEMA.names)

    def cohort(n, seed):
        parts, labels = _random_tumors(n, seed, channels=16)
        rng = np.random.default_rng(seed + 10)
        count = np.where(rng.random(n) < 0.5, 1, rng.integers(2, 6, n))
        parts["scan_log_tumors"] = np.log(count.astype(float))
        # several tumors: a metastasis; one: a meningioma or a schwannoma by the RoiPool vector
        labels["tumor_type"] = np.where(count > 1, 0, np.where(parts["roipool"][:, 0] > 0, 1, 2))
        return parts, labels

    parts, labels = cohort(160, 0)
    stats = fit_stats([{k: v[i] for k, v in parts.items()} for i in range(160)])
    assert stats["scan_log_tumors"]["sd"][0] > 0.3
    groups = np.arange(160) // 2
    heads = {flag: {**stats, "heads": fit_heads(parts, labels, DEFAULT_SCHEMA, stats, select="cv", groups=groups,
                                                scan_count=flag)} for flag in (False, True)}
    assert heads[True]["heads"]["scan_count"] is True and json.loads(json.dumps(heads[True])) == heads[True]
    assert "scan_log_tumors" in heads[True]["heads"]["tumor_type"]["inputs"]
    assert all("scan_log_tumors" not in h["inputs"] for h in heads[False]["heads"].values() if isinstance(h, dict))
    new, truth = cohort(300, 1)
    acc = {flag: (refit_probabilities(new, DEFAULT_SCHEMA, st, select="cv", scan_count=flag)[
        names.index("tumor_type")].argmax(1) == truth["tumor_type"]).mean() for flag, st in heads.items()}
    assert acc[True] >= 0.85 and acc[True] > acc[False] + 0.2
    # a tumor whose scan's count is unknown (NaN) reads the heads fit without it, the others the counted ones
    both = {**heads[True], "heads_uncounted": heads[False]["heads"]}
    unknown = {**new, "scan_log_tumors": np.where(np.arange(300) % 3 == 0, np.nan, new["scan_log_tumors"])}
    mixed = refit_probabilities(unknown, DEFAULT_SCHEMA, both, select="cv", scan_count=True)
    counted = refit_probabilities(new, DEFAULT_SCHEMA, heads[True], select="cv", scan_count=True)
    uncounted = refit_probabilities(new, DEFAULT_SCHEMA, heads[False], select="cv")
    rows = np.arange(300) % 3 == 0
    for m, c, u in zip(mixed, counted, uncounted, strict=True):
        assert np.allclose(m[rows], u[rows]) and np.allclose(m[~rows], c[~rows])
    t = names.index("tumor_type")  # the head the count tells
    assert not np.allclose(counted[t][rows], uncounted[t][rows])
    with pytest.raises(InputError, match=r"count is unknown .* has none of .* retune --manifest"):
        refit_probabilities(unknown, DEFAULT_SCHEMA, heads[True], select="cv", scan_count=True)
    with pytest.raises(InputError, match=r"^m\.pt: a tumor whose scan's tumor count is unknown"):
        require_uncounted(heads[True], "m.pt")  # what search --box checks first, naming the model file
    require_uncounted(both, "m.pt")
    # the statistics of an archive holding tumors of an unknown count (found without a mask) skip them
    rows = [{k: v[i] for k, v in unknown.items()} for i in range(300)]
    known = [r for r in rows if np.isfinite(r["scan_log_tumors"])]
    both, only = fit_stats(rows), fit_stats(known)
    for m in ("mean", "sd"):
        assert both["scan_log_tumors"][m] == pytest.approx(only["scan_log_tumors"][m])
    assert both["roipool"]["mean"] == pytest.approx(unknown["roipool"].mean(0).tolist())  # every row counts there
    recipe = dict(roipool=0.0, tasks=1.0, heads="refit", head_select="cv")
    with pytest.raises(InputError, match="scan_count: false, but the refit heads were fit with scan_count: true"):
        compose(new, RetrievalConfig(**recipe), DEFAULT_SCHEMA, heads[True])
    old = {k: v for k, v in new.items() if k != "scan_log_tumors"}
    with pytest.raises(InputError, match=r"no count of their scan's tumors .* embed the archive again"):
        compose(old, RetrievalConfig(**recipe, scan_count=True), DEFAULT_SCHEMA, heads[True])
    with pytest.raises(InputError, match=r"retrieval\.scan_count: expected true or false, got 1"):
        RetrievalConfig(scan_count=1)
    assert _grid_takes(tmp_path, "scan_count", "[false]", "[2]", "scan_count: expected true or false") == (False,)
    _keeps_older_fingerprints("scan_count", False, True)


def test_count_weight_lets_the_heads_weigh_the_count_against_many_inputs(tmp_path):
    """retrieval.count_weight -> the count's z-score is multiplied by it in the heads' inputs: under a strong
    L2 penalty (C = 0.1) and 64 RoiPool numbers of noise, a type that the count mostly tells is learned
    better with it at 10 than at 1 (three cohorts); the weight is stored with the heads, a recipe must
    match it, it needs scan_count, a grid may try it, and the default keeps older archives' fingerprints."""
    from embedder.embed import settings_fingerprint
    from tumornet.detect import DetectConfig
    from tumornet.fitted import count_weighted

    names = list(DEFAULT_SCHEMA.names)

    def cohort(n, seed):
        parts, labels = _random_tumors(n, seed, channels=64)
        count = np.where(np.random.default_rng(seed + 10).random(n) < 0.5, 1,
                         np.random.default_rng(seed + 20).integers(2, 6, n))
        parts["scan_log_tumors"] = np.log(count.astype(float))
        labels["tumor_type"] = np.where(count > 1, 0, np.where(parts["roipool"][:, 0] > 0, 1, 0))
        return parts, labels

    gain = []
    for seed in range(3):
        parts, labels = cohort(60, seed)
        stats = fit_stats([{k: v[i] for k, v in parts.items()} for i in range(60)])
        z = {w: count_weighted(stats, w)["scan_log_tumors"]["sd"][0] for w in (1, 10)}
        assert z[1] == pytest.approx(10 * z[10]) and stats["scan_log_tumors"]["sd"][0] == z[1]
        new, truth = cohort(400, seed + 100)
        acc = {}
        for w in (1, 10):
            st = {**stats, "heads": fit_heads(parts, labels, DEFAULT_SCHEMA, stats, c=0.1, scan_count=True,
                                              count_weight=w)}
            assert st["heads"]["count_weight"] == w and json.loads(json.dumps(st["heads"])) == st["heads"]
            p = refit_probabilities(new, DEFAULT_SCHEMA, st, scan_count=True, count_weight=w)
            acc[w] = (p[names.index("tumor_type")].argmax(1) == truth["tumor_type"]).mean()
        gain.append(acc[10] - acc[1])
    assert min(gain) > 0.02 and np.mean(gain) > 0.04, gain
    recipe = dict(roipool=0.0, tasks=1.0, heads="refit", scan_count=True)
    with pytest.raises(InputError, match="count_weight: 1, but the refit heads were fit with count_weight: 10"):
        compose(new, RetrievalConfig(**recipe), DEFAULT_SCHEMA, st)
    assert compose(new, RetrievalConfig(**recipe, count_weight=10), DEFAULT_SCHEMA, st).shape[0] == 400
    with pytest.raises(InputError, match=r"count_weight: 3 weighs the scan's tumor count.*scan_count: true"):
        RetrievalConfig(count_weight=3)
    with pytest.raises(InputError, match=r"retrieval\.count_weight: expected a number > 0, got 0"):
        RetrievalConfig(scan_count=True, count_weight=0)
    assert _grid_takes(tmp_path, "count_weight", "[1, 10]", "[0]", "count_weight: expected a number > 0") == (1, 10)
    site = dict(roipool=0.5, tasks=1.0, size=1.0, position=1.0, seg_size=0.5, heads="refit", standardize=True,
                scan_count=True)
    fp = [settings_fingerprint(2.0, 64, (RetrievalConfig(**site, **w), {"tumors": 3}), DetectConfig())
          for w in ({}, {"count_weight": 1.0}, {"count_weight": 10})]
    assert fp[0] == fp[1] == "7d3933e7d57fde23" != fp[2]  # as before count_weight (ee3a6cc3c3c7822c before BOX_EXTENT)
    mirrored = [settings_fingerprint(2.0, 64, (RetrievalConfig(**site, mirror=m), {"tumors": 3}), DetectConfig())
                for m in (False, True)]
    assert mirrored[0] == fp[0] != mirrored[1]  # archives embedded before retrieval.mirror stay valid
