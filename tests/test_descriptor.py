"""The retrieval vector: its parts, their scaling, the paper's recipe, and orientation invariance."""

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import SECRET
from embedder.embed import embed_scan
from tumornet.descriptor import RetrievalConfig, compose, fit_stats, head_box_voxels, tumor_parts, vector_size
from tumornet.errors import InputError
from tumornet.labels import DEFAULT_SCHEMA
from tumornet.manifest import read_manifest, write_manifest
from tumornet.network import MultitaskNet, NetConfig
from tumornet.scans import load_scan

RECIPE = RetrievalConfig(roipool=0.5, standardize=True, tasks=1.0, size=1.0, position=1.0)


def _model():
    torch.manual_seed(0)
    return MultitaskNet(NetConfig(channels=8, blocks=1), DEFAULT_SCHEMA).eval()


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
                RetrievalConfig(roipool=0.0, position=1.0)):
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


def test_an_lps_copy_of_a_scan_gives_the_same_vectors(small_cohort, tmp_path):
    """Position and size come from the canonical (RAS) working grid: the scan's storage orientation
    does not change them."""
    model = _model()
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
        assert np.allclose(ra["embedding"], rb["embedding"], atol=1e-4)
        assert ra["box_log_volume"] == pytest.approx(rb["box_log_volume"])
