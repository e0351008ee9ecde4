"""The retrieval vector: its parts, their scaling, the paper's recipe, and orientation invariance."""


import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import SECRET
from embedder.embed import embed_scan
from tumornet.descriptor import (
    compose,
    segmented_voxels,
    tumor_parts,
    tumors_parts,
    vector_size,
)
from tumornet.errors import InputError
from tumornet.fitted import fit_heads, fit_stats, refit_probabilities
from tumornet.labels import DEFAULT_SCHEMA
from tumornet.manifest import read_manifest, write_manifest
from tumornet.network import MultitaskNet, NetConfig
from tumornet.recipe import RetrievalConfig
from tumornet.scans import load_scan
from tumornet.volumes import head_box_voxels

RECIPE = RetrievalConfig(roipool=0.5, standardize=True, tasks=1.0, size=1.0, position=1.0)


def _model(coords: bool = False):
    torch.manual_seed(0)
    return MultitaskNet(NetConfig(channels=8, blocks=1, coords=coords), DEFAULT_SCHEMA).eval()


def _parts(small_cohort, model):
    parts = []
    for rows in list(read_manifest(small_cohort).scans().values())[:12]:
        scan = load_scan(rows, spacing_mm=4.0)
        head = head_box_voxels(scan.volume.array)
        parts += [tumor_parts(model, scan.volume.array, t.bbox, patch_size=16, spacing_mm=4.0, head=head)
                  for t in scan.tumors]
    return parts


def _stack(parts):
    return {k: np.stack([np.atleast_1d(p[k]) for p in parts]) for k in parts[0]}


def test_paper_recipe_is_the_raw_roipool_vector(small_cohort):
    model = _model()
    parts = _parts(small_cohort, model)
    x = compose(_stack(parts), RetrievalConfig(), DEFAULT_SCHEMA, None)
    assert np.array_equal(x, _stack(parts)["roipool"].astype(np.float32))
    with pytest.raises(InputError, match="needs the training tumors' statistics"):
        compose(_stack(parts), RECIPE, DEFAULT_SCHEMA, None)
    with pytest.raises(InputError, match="weights must be >= 0 and not all 0"):
        RetrievalConfig(roipool=0.0)


def test_each_part_counts_about_one_between_random_tumors(small_cohort):
    model = _model()
    parts = _parts(small_cohort, model)
    stats = fit_stats(parts)
    stacked = _stack(parts)
    assert all(np.all(np.abs(p["position"]) < 1.5) for p in parts)  # inside the head: [-1, 1] per axis
    for cfg in (RetrievalConfig(roipool=1.0, standardize=True), RetrievalConfig(roipool=0.0, size=1.0),
                RetrievalConfig(roipool=0.0, position=1.0), RetrievalConfig(roipool=0.0, seg_size=1.0),
                RetrievalConfig(roipool=0.0, roimean=1.0), RetrievalConfig(roipool=0.0, context=1.0)):
        x = compose(stacked, cfg, DEFAULT_SCHEMA, stats).astype(np.float64)
        d2 = ((x[:, None] - x[None]) ** 2).sum(-1)
        n = len(x)
        # mean over pairs of distinct tumors: 1 (x n / (n - 1), as the statistics use the population sd)
        assert d2.sum() / (n * (n - 1)) == pytest.approx(n / (n - 1), rel=1e-6)
    x = compose(stacked, RECIPE, DEFAULT_SCHEMA, stats)
    assert x.shape == (len(parts), vector_size(RECIPE, 8, DEFAULT_SCHEMA)) == (len(parts), 8 + 20 + 1 + 3)
    # each task's probabilities: two tumors of different predicted classes differ by about 1 per task
    one = compose(stacked, RetrievalConfig(roipool=0.0, tasks=1.0), DEFAULT_SCHEMA, stats)
    assert np.allclose(one.reshape(len(parts), -1)[:, :3].sum(1), 1 / np.sqrt(2), atol=1e-5)


@pytest.mark.parametrize("coords", [False, True])
def test_an_lps_copy_of_a_scan_gives_the_same_vectors(small_cohort, tmp_path, coords):
    """Position, size and coordinate channels come from the canonical (RAS) working grid: the
    scan's storage orientation does not change them."""
    model = _model(coords)
    cohort = read_manifest(small_cohort)
    rows = next(r for r in cohort.scans().values() if len(r) > 1)
    for name, src in (("img", rows[0].image), ("msk", rows[0].mask)):
        img = nib.load(src)
        ras = nib.as_closest_canonical(img)
        lps = ras.as_reoriented([[0, -1], [1, -1], [2, 1]])
        nib.save(lps, tmp_path / f"{name}.nii.gz")
        assert nib.aff2axcodes(lps.affine) == ("L", "P", "S")
    copy = [{"patient_id": "P", "scan_id": "S", "image": "img.nii.gz", "mask": "msk.nii.gz", "tumor_id": r.tumor_id}
            for r in rows]
    lps_rows = read_manifest(write_manifest(tmp_path / "m.csv", copy)).rows
    parts = _parts(small_cohort, model)
    recipe = (RECIPE, fit_stats(parts))
    a = embed_scan(model, "m", rows, spacing_mm=4.0, patch_size=16, secret=SECRET, recipe=recipe)
    b = embed_scan(model, "m", lps_rows, spacing_mm=4.0, patch_size=16, secret=SECRET, recipe=recipe)
    assert [r["tumor_id"] for r in a] == [r["tumor_id"] for r in b]
    for ra, rb in zip(a, b, strict=True):
        assert np.allclose(ra["position"], rb["position"], atol=1e-4)
        # the registration onto the template sees the same canonical array: the same place
        assert np.allclose(ra["template_position"], rb["template_position"], atol=1e-4)
        assert len(ra["atlas"]) == 13 and np.allclose(ra["atlas"], rb["atlas"], atol=1e-4)  # and what the atlas says
        assert np.allclose(ra["embedding"], rb["embedding"], atol=1e-4)
        assert ra["box_log_volume"] == pytest.approx(rb["box_log_volume"])
        for key in ("roimean", "context"):  # the pooled parts too: the same feature map
            assert len(ra[key]) == 8 and np.allclose(ra[key], rb[key], atol=1e-4)


def test_segmented_size_counts_whole_components_the_box_touches():
    fg = np.zeros((40, 40, 40), bool)
    fg[5:15, 5:15, 5:15] = True  # 1000 voxels
    fg[25:30, 25:30, 25:30] = True  # 125 voxels, apart
    assert segmented_voxels(fg, [5, 5, 5, 15, 15, 15]) == 1000
    assert segmented_voxels(fg, [3, 3, 3, 18, 18, 18]) == 1000  # a box too large: the same tumor
    assert segmented_voxels(fg, [8, 8, 8, 11, 11, 11]) == 1000  # too small, inside it: the whole component
    assert segmented_voxels(fg, [10, 10, 10, 27, 27, 27]) == 1125  # touching both
    assert segmented_voxels(fg, [30, 0, 0, 40, 6, 6]) == round(np.pi / 6 * 10 * 6 * 6)  # none: the ellipsoid
    # a drawn box's own extent (the voxels covering it are larger): its ellipsoid; a segmented tumor: unchanged
    assert segmented_voxels(fg, [30, 0, 0, 40, 6, 6], [8.4, 4.8, 4.8]) == round(np.pi / 6 * 8.4 * 4.8 * 4.8)
    assert segmented_voxels(fg, [3, 3, 3, 18, 18, 18], [12.0, 12.0, 12.0]) == 1000


def test_tumors_of_a_scan_in_one_batch_give_the_same_parts(small_cohort):
    model = _model()
    rows = max(read_manifest(small_cohort).scans().values(), key=len)
    scan = load_scan(rows, spacing_mm=4.0)
    boxes = [t.bbox for t in scan.tumors] + [scan.tumors[0].bbox + np.array([0, 0, 0, 9, 9, 9])]  # a larger patch
    assert len(boxes) >= 3
    together = tumors_parts(model, scan.volume.array, boxes, patch_size=16, spacing_mm=4.0, batch=2)
    for box, parts in zip(boxes, together, strict=True):
        alone = tumor_parts(model, scan.volume.array, box, patch_size=16, spacing_mm=4.0, scan_tumors=len(boxes))
        for key in alone:
            np.testing.assert_allclose(parts[key], alone[key], rtol=1e-4, atol=1e-5)
    assert together[0]["scan_log_tumors"] == pytest.approx(np.log(len(boxes)))  # the scan's count: its boxes
    assert tumor_parts(model, scan.volume.array, boxes[0], patch_size=16, spacing_mm=4.0)["scan_log_tumors"] == 0.0


def test_whitening_decorrelates_the_roipool_vector(small_cohort):
    """whiten: the standardized RoiPool vector rotated and scaled by the training tumors' covariance
    (shrunk): its channels come out uncorrelated, and two random tumors still differ by about 1."""
    rng = np.random.default_rng(0)
    n = 200
    mix = rng.normal(size=(8, 8))  # correlated channels
    parts = {"roipool": np.maximum(rng.normal(size=(n, 8)) @ mix, 0), "position": rng.uniform(-1, 1, (n, 3)),
             "box_log_volume": rng.normal(size=n), "task_logits": rng.normal(size=(n, 20))}
    stats = fit_stats([{k: v[i] for k, v in parts.items()} for i in range(n)])
    z = compose(parts, RetrievalConfig(standardize=True), DEFAULT_SCHEMA, stats).astype(np.float64)
    w = compose(parts, RetrievalConfig(whiten=True), DEFAULT_SCHEMA, stats).astype(np.float64)
    off = ~np.eye(8, dtype=bool)
    assert np.abs(np.corrcoef(z, rowvar=False)[off]).max() > 0.5
    assert np.abs(np.corrcoef(w, rowvar=False)[off]).max() < 1e-6
    d2 = ((w[:, None] - w[None]) ** 2).sum(-1).sum() / (n * (n - 1))
    assert 0.5 < d2 < 1.1  # about 1 (below it by the shrinkage)
    with pytest.raises(InputError, match="no whitening of the RoiPool vector"):
        compose(parts, RetrievalConfig(whiten=True), DEFAULT_SCHEMA,
                {**stats, "roipool": {k: v for k, v in stats["roipool"].items() if k != "whiten"}})
    recipe = RetrievalConfig(roipool=0.5, whiten=True, roimean=0.5, context=1.0)
    assert vector_size(recipe, 8, DEFAULT_SCHEMA) == 24


def test_the_template_position_is_read_when_the_recipe_says_so():
    """position_frame: template -> the position part and the refit heads read `template_position`
    (a label that only it tells is learned); heads fit on one frame refuse a recipe of the other."""
    rng = np.random.default_rng(1)
    n, names = 120, list(DEFAULT_SCHEMA.names)
    parts = {"roipool": rng.normal(size=(n, 8)), "position": rng.uniform(-1, 1, (n, 3)),
             "template_position": rng.uniform(-1, 1, (n, 3)), "box_log_volume": rng.normal(size=n),
             "task_logits": rng.normal(size=(n, 20))}
    labels = {t: np.full(n, -1) for t in names}
    labels["left_right"] = (parts["template_position"][:, 0] > 0).astype(int)  # only the template says it
    stats = fit_stats([{k: v[i] for k, v in parts.items()} for i in range(n)])
    template = RetrievalConfig(roipool=0.0, position=1.0, position_frame="template")
    z = (parts["template_position"] - stats["template_position"]["mean"]) / stats["template_position"]["sd"]
    assert np.allclose(compose(parts, template, DEFAULT_SCHEMA, stats), z / np.sqrt(6), atol=1e-6)
    assert template.needs_frame and not RetrievalConfig(roipool=1.0, position_frame="template").needs_frame
    accuracy = {}
    for frame in ("head", "template"):
        st = {**stats, "heads": fit_heads(parts, labels, DEFAULT_SCHEMA, stats, position_frame=frame)}
        probs = refit_probabilities(parts, DEFAULT_SCHEMA, st, position_frame=frame)[names.index("left_right")]
        accuracy[frame] = (probs.argmax(1) == labels["left_right"]).mean()
    assert accuracy["template"] >= 0.95 and accuracy["head"] < 0.8
    # position_frame: atlas -> the refit heads also read what the atlas says of the box (a label only it tells)
    parts["atlas"] = np.eye(13)[rng.integers(0, 13, n)]
    labels["area"] = parts["atlas"].argmax(1) % 11
    stats = fit_stats([{k: v[i] for k, v in parts.items()} for i in range(n)])
    for frame in ("template", "atlas"):
        st = {**stats, "heads": fit_heads(parts, labels, DEFAULT_SCHEMA, stats, position_frame=frame)}
        probs = refit_probabilities(parts, DEFAULT_SCHEMA, st, position_frame=frame)[names.index("area")]
        accuracy[frame] = (probs.argmax(1) == labels["area"]).mean()
    assert accuracy["atlas"] >= 0.95 and accuracy["template"] < 0.5
    assert RetrievalConfig(roipool=0.0, position=1.0, position_frame="atlas").position_key == "template_position"
    with pytest.raises(InputError, match="position_frame: template, but the refit heads read the head position"):
        compose(parts, RetrievalConfig(roipool=0.0, tasks=1.0, heads="refit", position_frame="template"),
                DEFAULT_SCHEMA, {**stats, "heads": fit_heads(parts, labels, DEFAULT_SCHEMA, stats)})
    with pytest.raises(InputError, match=r"retrieval\.position_frame: expected head, template or atlas, got 'mni'"):
        RetrievalConfig(position_frame="mni")


def test_size_units_mm_reads_the_equivalent_diameter():
    """size_units: mm -> the size parts read the equivalent-sphere diameter (mm) of the box / segmented
    volume, so two large tumors 5 mm apart differ more than two small ones 1 mm apart (the same ratio),
    where the log volume makes them equal; the statistics hold the diameters too."""
    from tumornet.fitted import with_diameters

    sphere_ml = 4.0 / 3.0 * np.pi * 10.0 ** 3 / 1000.0  # a 20 mm sphere
    d = with_diameters({"box_log_volume": np.log([sphere_ml]), "seg_log_volume": np.log([sphere_ml / 8])})
    assert d["box_diameter_mm"][0] == pytest.approx(20.0) and d["seg_diameter_mm"][0] == pytest.approx(10.0)
    assert "seg_diameter_mm" not in with_diameters({"box_log_volume": np.zeros(1)})

    mm = np.array([5.0, 6.0, 25.0, 30.0])  # two pairs, both 1.2x apart
    log_v = np.log(np.pi / 6 * mm ** 3 / 1000.0)
    parts = {"roipool": np.zeros((4, 2)), "box_log_volume": log_v, "seg_log_volume": log_v}
    stats = fit_stats([{k: v[i] for k, v in parts.items()} for i in range(4)])
    assert stats["box_diameter_mm"]["mean"][0] == pytest.approx(mm.mean())
    assert stats["box_diameter_mm"]["sd"][0] == pytest.approx(mm.std())
    for units, ratio in (("log", 1.0), ("mm", 5.0)):
        for key in ("size", "seg_size"):
            x = compose(parts, RetrievalConfig(roipool=0.0, **{key: 1.0}, size_units=units), DEFAULT_SCHEMA, stats)
            assert x.shape == (4, 1)
            assert abs(x[3, 0] - x[2, 0]) / abs(x[1, 0] - x[0, 0]) == pytest.approx(ratio, rel=1e-5)
    with pytest.raises(InputError, match="size_units: expected log or mm, got 'cm'"):
        RetrievalConfig(size_units="cm")
    old = {k: v for k, v in stats.items() if k != "box_diameter_mm"}  # a model file exported before
    with pytest.raises(InputError, match="no training statistics of `box_diameter_mm`"):
        compose(parts, RetrievalConfig(roipool=0.0, size=1.0, size_units="mm"), DEFAULT_SCHEMA, old)


def _keeps_older_fingerprints(key: str, default, other) -> None:
    """A recipe key added later, at its default, leaves the embedding fingerprint of the site recipe as the
    version before it computed it; another value changes it."""
    from embedder.embed import settings_fingerprint
    from tumornet.detect import DetectConfig

    recipe = dict(roipool=0.5, tasks=1.0, size=1.0, position=1.0, seg_size=0.5, heads="refit", standardize=True)
    fp = [settings_fingerprint(2.0, 64, (RetrievalConfig(**recipe, **{key: v}), {"tumors": 3}), DetectConfig())
          for v in (default, other)]
    assert fp[0] == "ac803b773e72cc20" and fp[1] != fp[0]  # 18bcc0f1f9804716 before the box extent (BOX_EXTENT)


def test_task_temperature_sharpens_the_tasks_part():
    """task_temperature t: each task's probabilities are softmax(logits / t), for the network's heads
    and the refit ones; t = 1 is the vector before it existed; t <= 0 is refused (config and grid)."""
    from tumornet.fitted import _softmax

    rng = np.random.default_rng(1)
    n, names = 60, list(DEFAULT_SCHEMA.names)
    parts = {"roipool": rng.normal(size=(n, 8)), "position": rng.uniform(-1, 1, (n, 3)),
             "box_log_volume": rng.normal(size=n), "task_logits": rng.normal(size=(n, 20))}
    labels = {t: rng.integers(0, DEFAULT_SCHEMA[t].n_classes, n) for t in names}
    stats = fit_stats([{k: v[i] for k, v in parts.items()} for i in range(n)])
    stats["heads"] = fit_heads(parts, labels, DEFAULT_SCHEMA, stats)
    for heads in ("network", "refit"):
        x1, xs = (compose(parts, RetrievalConfig(roipool=0.0, tasks=1.0, heads=heads, task_temperature=t),
                          DEFAULT_SCHEMA, stats) for t in (1.0, 0.25))
        assert np.array_equal(x1, compose(parts, RetrievalConfig(roipool=0.0, tasks=1.0, heads=heads),
                                          DEFAULT_SCHEMA, stats))
        p1, ps = (x[:, 3 + 11 + 0:3 + 11 + 2] * np.sqrt(2) for x in (x1, xs))  # left_right after type, area
        assert np.allclose(p1.sum(1), 1.0, atol=1e-5) and np.allclose(ps.sum(1), 1.0, atol=1e-5)
        assert (np.abs(ps - 0.5) >= np.abs(p1 - 0.5) - 1e-6).all()  # sharper, the same side
        assert ((ps[:, 1] > 0.5) == (p1[:, 1] > 0.5)).all()
    logits = parts["task_logits"][:, 14:16]
    net = compose(parts, RetrievalConfig(roipool=0.0, tasks=1.0, task_temperature=0.25), DEFAULT_SCHEMA, stats)
    assert np.allclose(net[:, 14:16] * np.sqrt(2), _softmax(4 * logits), atol=1e-5)
    with pytest.raises(InputError, match="task_temperature: expected a number > 0, got 0"):
        RetrievalConfig(task_temperature=0)


def test_mirror_averages_the_pooled_features_with_the_mirror_images(small_cohort, tmp_path):
    """retrieval.mirror: RoiPool, mean and context are the mean of the scan's and of its left-right mirror's
    (the box mirrored with it), so the scan and its mirror give the same; the other parts stay the scan's."""
    from retrieval.experiments import read_grid
    from tumornet.descriptor import MIRROR_AVERAGED, mirrored

    model = _model()
    rows = max(read_manifest(small_cohort).scans().values(), key=len)
    image = load_scan(rows, spacing_mm=4.0).volume.array
    boxes = [t.bbox for t in load_scan(rows, spacing_mm=4.0).tumors]
    head = head_box_voxels(image)
    flipped, flipped_boxes, flipped_head = mirrored(image, boxes, head)
    assert np.array_equal(flipped[::-1], image) and np.allclose(flipped_head[0], head_box_voxels(flipped)[0])
    assert np.array_equal(flipped[flipped_boxes[0][0]:flipped_boxes[0][3]][::-1],
                          image[boxes[0][0]:boxes[0][3]])  # the box holds the same voxels, mirrored
    kw = dict(patch_size=16, spacing_mm=4.0)
    plain = tumors_parts(model, image, boxes, **kw)
    seen = tumors_parts(model, flipped, flipped_boxes, **kw)
    both = tumors_parts(model, image, boxes, mirror=True, **kw)
    again = tumors_parts(model, flipped, flipped_boxes, mirror=True, **kw)
    for p, q, b, a in zip(plain, seen, both, again, strict=True):
        for key in MIRROR_AVERAGED:
            np.testing.assert_allclose(b[key], (p[key] + q[key]) / 2, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-6)  # either side: one vector
            assert b[key].dtype == p[key].dtype
        assert not np.allclose(p["roipool"], q["roipool"])  # the network does see the mirror otherwise
        for key in ("task_logits", "box_log_volume", "position", "seg_log_volume", "scan_log_tumors"):
            np.testing.assert_array_equal(b[key], p[key])  # the scan's own
    with pytest.raises(InputError, match=r"retrieval\.mirror: expected true or false, got 'yes'"):
        RetrievalConfig(mirror="yes")
    grid = tmp_path / "grid.yaml"
    grid.write_text("mirror: [false, true]\n")
    with pytest.raises(InputError, match="mirror: a grid composes the shards' parts"):
        read_grid(grid)
