"""A drawn box's size read partly from the tumor the segmentation head sees in it (tumornet.drawn: the
retrieval recipe's search-time `drawn_size`, twentieth round, and `drawn_read: fit`, the regression fit at
export, twenty-fifth round), with a stand-in network or probability map whose tumor is known."""

from pathlib import Path

import numpy as np
import pytest
import torch

from embedder.embed import embed_read
from retrieval.search import drawn_box_parts
from tumornet.descriptor import tumors_parts
from tumornet.drawn import box_log_volume, drawn_extent, tumor_span, with_drawn_size
from tumornet.errors import InputError
from tumornet.labels import DEFAULT_SCHEMA
from tumornet.manifest import ManifestRow
from tumornet.network import MultitaskNet, NetConfig
from tumornet.recipe import SEARCH_ONLY, RetrievalConfig
from tumornet.scans import Scan
from tumornet.tumors import measure_tumors
from tumornet.volumes import Volume

TUMOR = (slice(20, 26), slice(18, 24), slice(21, 25))  # 6 x 6 x 4 voxels
LOOSE = [17, 15, 18, 30, 27, 28]  # 13 x 12 x 10: too large on every side, grazing a neighbour


class _Crisp(torch.nn.Module):
    def forward(self, f):  # tumor probability sigmoid(20 (intensity - 0.5)): ~1 inside, ~0 outside
        x = f[:, :1]
        return torch.cat([torch.zeros_like(x), 20 * (x - 0.5)], 1)


def _crisp_model() -> MultitaskNet:
    model = MultitaskNet(NetConfig(channels=4, blocks=1), DEFAULT_SCHEMA)
    model.features = lambda x, frames: x.expand(-1, 4, -1, -1, -1)
    model.seg_head = _Crisp()
    return model


def _image() -> np.ndarray:
    image = np.zeros((48, 48, 48), np.float32)
    image[TUMOR] = 1.0
    image[29:33, 20:24, 21:25] = 1.0  # a neighbour the loose box grazes, not touching the tumor
    return image


def test_tumor_span_reads_the_tumor_in_a_loose_box_and_nothing_where_nothing_is_seen():
    prob = np.zeros((40, 40, 40))
    prob[10:16, 12:18, 5:9] = 0.8
    prob[19:22, 12:18, 5:9] = 0.8  # beyond a gap: another run, not the one of the peak
    # each edge's crossing of 0.3 x the peak lies 0.7 voxel out from the last voxel inside: n + 0.4
    assert tumor_span(prob, [8, 10, 3, 18, 20, 11]) == pytest.approx([6.4, 6.4, 4.4])
    # the run is measured over the whole patch, also beyond the box (a box too small does not shrink it)
    assert tumor_span(prob, [11, 13, 6, 14, 16, 8]) == pytest.approx([6.4, 6.4, 4.4])
    assert np.isnan(tumor_span(prob * 0.2, [8, 10, 3, 18, 20, 11])).all()  # a peak under 0.2: nothing seen
    assert np.isnan(tumor_span(prob, [30, 30, 30, 35, 35, 35])).all()


def test_drawn_extent_blends_toward_the_span_and_never_grows_a_box():
    box = np.array([13.0, 12.0, 10.0])
    assert np.allclose(drawn_extent(box, [6.0, 6.0, 4.0], 0), box)
    assert np.allclose(drawn_extent(box, [6.0, 6.0, 4.0], 1), [6, 6, 4])
    third = drawn_extent(box, [6.0, 6.0, 4.0], 1 / 3)
    assert np.allclose(np.log(third), (2 * np.log(box) + np.log([6, 6, 4])) / 3)
    assert np.allclose(drawn_extent(box, [20.0, 30.0, 10.0], 0.5), box)  # a span wider than the box: the box's
    assert np.allclose(drawn_extent(box, [np.nan] * 3, 0.5), box)  # nothing seen: the box as drawn


def test_a_loose_box_reads_nearer_the_tumors_size_and_an_exact_one_its_own():
    model, image = _crisp_model(), _image()
    exact = [20, 18, 21, 26, 24, 25]
    loose, tight = tumors_parts(model, image, [LOOSE, exact], patch_size=32, spacing_mm=2.0)
    assert loose["tumor_span"] == pytest.approx([6.4, 6.4, 4.4], abs=0.01)  # the neighbour is not its run
    assert np.allclose(loose["extent"], [13, 12, 10]) and np.allclose(tight["extent"], [6, 6, 4])
    assert loose["box_log_volume"] == pytest.approx(box_log_volume([13, 12, 10], 2.0))  # parts: the box's own
    half = with_drawn_size(loose, 0.5, 2.0)
    want = np.log(np.prod(np.sqrt(np.array([13, 12, 10]) * [6.4, 6.4, 4.4])) * 8 / 1000)
    assert half["box_log_volume"] == pytest.approx(want, abs=1e-3)
    assert np.allclose(half["roipool"], loose["roipool"]) and half["position"] is loose["position"]
    assert with_drawn_size(tight, 0.5, 2.0)["box_log_volume"] == pytest.approx(tight["box_log_volume"])
    assert with_drawn_size(loose, 0.0, 2.0)["box_log_volume"] == loose["box_log_volume"]


def test_a_search_by_box_and_the_robustness_boxes_read_the_recipes_drawn_size(tmp_path: Path):
    model, image = _crisp_model(), _image()
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    vol = Volume(array=image, spacing_mm=(2.0, 2.0, 2.0), affine=affine, scan_id="q")
    loose_mm = np.array([17, 15, 18, 30, 27, 28], float) * 2 - 1  # the voxels' outer edges in mm
    as_drawn = drawn_box_parts(model, vol, loose_mm, cfg=RetrievalConfig(), patch_size=32, where="q")
    blended = drawn_box_parts(model, vol, loose_mm, cfg=RetrievalConfig(drawn_size=0.5), patch_size=32, where="q")
    assert as_drawn["box_log_volume"] == pytest.approx(box_log_volume([13, 12, 10], 2.0))
    assert blended["box_log_volume"] < as_drawn["box_log_volume"] - 0.5  # 13 x 12 x 10 -> about 9 x 9 x 7
    assert np.allclose(blended["roipool"], as_drawn["roipool"])
    # a refined box is the tumor's own: its size is not blended again
    refined = drawn_box_parts(model, vol, loose_mm, cfg=RetrievalConfig(drawn_size=0.5, refine_box=True),
                              patch_size=32, where="q")
    assert refined["box_log_volume"] == pytest.approx(box_log_volume([6, 6, 4], 2.0))
    # evaluate --robustness: distorted boxes read their size as a search by box does; exact boxes never
    instances = np.zeros(image.shape, np.int32)
    instances[TUMOR] = 1
    scan = Scan(volume=vol, instances=instances, tumors=tuple(measure_tumors(instances, affine, scan_id="q")))
    rows = [ManifestRow(row=1, patient_id="P", scan_id="q", image=tmp_path / "q.nii.gz", mask=tmp_path / "m.nii.gz",
                        tumor_id=1, labels={})]

    def embedded(box_fn, drawn_size):
        (row,) = embed_read(model, "m", rows, scan, spacing_mm=2.0, patch_size=32, secret=b"k" * 32, file_hash="",
                            box_fn=box_fn, recipe=(RetrievalConfig(drawn_size=drawn_size), None))
        return row["box_log_volume"]

    def grown(b):
        return np.array(LOOSE)

    assert embedded(grown, 0.5) < embedded(grown, 0.0) - 0.5
    assert embedded(None, 0.5) == pytest.approx(embedded(None, 0.0))  # a mask's box: its own extent


def test_drawn_size_is_a_search_time_weight():
    assert RetrievalConfig().drawn_size == 0 and "drawn_size" in SEARCH_ONLY  # archives stay valid
    for bad in (-0.1, 1.5, True, "half"):
        with pytest.raises(InputError, match=r"retrieval\.drawn_size: expected a weight from 0 to 1"):
            RetrievalConfig(drawn_size=bad)


def test_span_profile_reads_where_the_tumor_ends_in_the_box():
    from tumornet.drawn import span_profile
    prob = np.zeros((40, 40, 40))
    prob[10:20, 12:18, 5:9] = 0.8
    # runs at 0.1 / 0.2 / 0.3 / 0.5 / 0.7 of the peak: each edge's crossing (1 - level) voxel out: n + 2 (1 - level) - 1
    widths = [10.8, 10.6, 10.4, 10.0, 9.6]
    loose = span_profile(prob, [8, 10, 3, 22, 20, 11])
    assert loose.shape == (3, 10) and np.allclose(loose[:, 0], 0.8)
    assert loose[0, 1:6] == pytest.approx(widths) and loose[2, 1:6] == pytest.approx([4.8, 4.6, 4.4, 4.0, 3.6])
    assert np.allclose(loose[:, 6:], 0.0)  # a loose box: its end faces and beyond hold nothing
    exact = span_profile(prob, [10, 12, 5, 20, 18, 9])
    assert exact[0, 1:6] == pytest.approx(widths)
    assert np.allclose(exact[:, 6:8], 1.0) and np.allclose(exact[:, 8:], 0.0)  # the tumor fills its end faces
    tight = span_profile(prob, [12, 13, 6, 18, 17, 8])
    assert np.allclose(tight[:, 6:], 1.0)  # a box too small: the tumor goes on beyond it
    assert np.allclose(span_profile(prob * 0, [8, 10, 3, 22, 20, 11]), 0.0)


def _drawn_boxes(rng, n_boxes: int, *, scale_sd: float = 1 / 3):
    """Tumors of 4-12 voxels per axis in a crisp probability map and boxes drawn around them with each
    side scaled by 2^N(0, scale_sd) -> (span profiles, drawn extents, true extents)."""
    from tumornet.drawn import span_profile
    profiles, extents, trues = [], [], []
    for _ in range(n_boxes):
        size = rng.integers(4, 13, 3)
        prob = np.zeros((48, 48, 48))
        lo = (48 - size) // 2
        prob[lo[0]:lo[0] + size[0], lo[1]:lo[1] + size[1], lo[2]:lo[2] + size[2]] = 0.9
        drawn = np.maximum(np.rint(size * np.exp2(rng.normal(0, scale_sd, 3))), 2).astype(int)
        b0 = 24 - drawn // 2
        profiles.append(span_profile(prob, [*b0, *(b0 + drawn)]))
        extents.append(drawn.astype(float))
        trues.append(size.astype(float))
    return np.array(profiles), np.array(extents), np.array(trues)


def test_a_fitted_read_moves_loose_and_tight_boxes_toward_the_tumors_extent():
    from tumornet.drawn import fit_drawn_size, fitted_extent
    rng = np.random.default_rng(0)
    fit = fit_drawn_size(*_drawn_boxes(rng, 150))["drawn_fit"]
    assert len(fit["coef"]) == 8 and fit["axes"] == 450 and fit["resid_sd"] < 0.01  # a crisp map: nearly exact
    profiles, extents, trues = _drawn_boxes(rng, 60)
    read = np.array([fitted_extent(e, p, fit, 1.0) for p, e in zip(profiles, extents, strict=True)])
    before, after = np.abs(np.log(extents / trues)), np.abs(np.log(read / trues))
    assert after.mean() < 0.01 < 0.12 < before.mean()  # boxes off by ~0.16 in log per axis read within 0.01
    loose, tight = (extents > trues * 1.2), (extents < trues / 1.2)
    assert (read[loose] < extents[loose]).mean() > 0.9 and (read[tight] > extents[tight]).mean() > 0.9
    half = np.array([fitted_extent(e, p, fit, 0.5) for p, e in zip(profiles, extents, strict=True)])
    assert np.allclose(np.log(half), (np.log(read) + np.log(extents)) / 2)  # the weight blends in log
    unseen = profiles.copy()
    unseen[:, :, 0] = 0.1  # a peak under 0.2: the box's own extent
    assert np.allclose(fitted_extent(extents[0], unseen[0], fit, 1.0), extents[0])
    assert fit_drawn_size(profiles[:3] * 0, extents[:3], trues[:3]) == {}  # nothing seen: no regression stored


def test_drawn_read_fit_is_a_search_time_key_that_needs_the_models_regression(tmp_path: Path):
    from embedder.embed import settings_fingerprint
    from tumornet.detect import DetectConfig
    from tumornet.drawn import drawn_fit_of
    assert RetrievalConfig().drawn_read == "span" and "drawn_read" in SEARCH_ONLY
    with pytest.raises(InputError, match=r"retrieval\.drawn_read: expected span or fit, got 'mask'"):
        RetrievalConfig(drawn_read="mask")
    cfg = RetrievalConfig(drawn_size=1.0, drawn_read="fit")
    with pytest.raises(InputError, match=r"old\.pt: retrieval\.drawn_read: fit needs the drawn-box size regression"):
        drawn_fit_of(cfg, {"tumors": 3}, "old.pt")
    assert drawn_fit_of(RetrievalConfig(drawn_size=1.0), {}, "m.pt") is None  # span: no regression read
    fit = fit_drawn_size_on_boxes()
    assert drawn_fit_of(cfg, {"drawn_fit": fit}, "m.pt") is fit
    # a model file that gains the regression keeps its archives: the stored vectors do not read it
    stats = {"tumors": 3, "box_log_volume": {"mean": [0.0], "sd": [1.0]}}
    same = settings_fingerprint(2.0, 64, (cfg, stats), DetectConfig())
    assert settings_fingerprint(2.0, 64, (cfg, {**stats, "drawn_fit": fit}), DetectConfig()) == same
    assert settings_fingerprint(2.0, 64, (cfg, {**stats, "tumors": 4}), DetectConfig()) != same
    # a search by box reads the regression: a loose box reads smaller; without it the search is refused
    model, image = _crisp_model(), _image()
    vol = Volume(array=image, spacing_mm=(2.0, 2.0, 2.0), affine=np.diag([2.0, 2.0, 2.0, 1.0]), scan_id="q")
    loose_mm = np.array(LOOSE, float) * 2 - 1
    as_drawn = drawn_box_parts(model, vol, loose_mm, cfg=RetrievalConfig(), patch_size=32, where="q")
    fitted = drawn_box_parts(model, vol, loose_mm, cfg=cfg, patch_size=32, where="q", drawn_fit=fit)
    assert fitted["box_log_volume"] < as_drawn["box_log_volume"] - 0.8  # 13 x 12 x 10 -> near 6 x 6 x 4
    assert fitted["box_log_volume"] == pytest.approx(box_log_volume([6, 6, 4], 2.0), abs=0.35)
    with pytest.raises(InputError, match=r"q: retrieval\.drawn_read: fit needs"):
        drawn_box_parts(model, vol, loose_mm, cfg=cfg, patch_size=32, where="q")


def fit_drawn_size_on_boxes():
    from tumornet.drawn import fit_drawn_size
    return fit_drawn_size(*_drawn_boxes(np.random.default_rng(1), 120))["drawn_fit"]


def test_export_statistics_fit_the_drawn_box_size_on_each_boxs_own_tumor(small_cohort, tmp_path, monkeypatch):
    """retrieval_stats fits the drawn-box size regression (retrieval.drawn_read: fit) on the exact boxes and
    the rough copies, each paired with its own tumor's extent."""
    import trainer.loop as loop
    from tumornet.cache import prepare_scan
    from tumornet.config import load_config, with_overrides
    from tumornet.manifest import read_manifest

    cfg = with_overrides(load_config("demo"), data={"spacing_mm": 4.0}, train={"patch_size": 16},
                         retrieval={"position_frame": "head", "heads": "refit", "head_draws": 3})
    scans = [prepare_scan(rows, spacing_mm=4.0, cache_dir=tmp_path / "cache")
             for rows in list(read_manifest(small_cohort).scans().values())[:10]]
    seen = {}
    monkeypatch.setattr(loop, "fit_drawn_size", lambda p, e, t: seen.update(profiles=p, extents=e, true=t) or {})
    from test_descriptor import _model

    loop.retrieval_stats(_model(), scans, cfg)
    n = sum(len(s.tumors) for s in scans)
    extents, true = np.asarray(seen["extents"]), np.asarray(seen["true"])
    assert seen["profiles"].shape == (4 * n, 3, 10) and extents.shape == true.shape == (4 * n, 3)
    assert np.allclose(extents[:n], true[:n])  # an exact box: the tumor's own extent
    off = np.log(extents[n:] / true[n:])  # a rough copy: eq. 2's scale, log2 ~ N(0, 1/3) per axis, rounded
    assert abs(off.mean()) < 0.1 and 0.15 < off.std() < 0.35
    assert np.corrcoef(np.log(extents[n:]).ravel(), np.log(true[n:]).ravel())[0, 1] > 0.7  # its own tumor's
