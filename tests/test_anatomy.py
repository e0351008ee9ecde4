import numpy as np
import pytest

from tumornet.anatomy import ATLAS_FEATURES, fit_alignment, load_anatomy
from tumornet.labels import AREAS


@pytest.fixture(scope="module")
def anat():
    return load_anatomy()


@pytest.mark.parametrize(
    ("point", "area", "lr", "fr", "ul"),
    [
        ((40, 30, 40), "frontal", "right", "front", "upper"),
        ((-40, -80, 10), "occipital", "left", "rear", "upper"),
        ((-30, -40, 55), "parietal", "left", "rear", "upper"),
        ((50, -20, -15), "temporal", "right", "rear", "lower"),
        ((40, -5, 5), "insula", "right", "front", "lower"),
        ((-12, -18, 8), "deep_grey_matter", "left", "rear", "upper"),
        ((25, -65, -35), "cerebellum", "right", "rear", "lower"),
        ((3, -30, -35), "brainstem", "right", "rear", "lower"),
    ],
)
def test_known_template_points(anat, point, area, lr, fr, ul):
    d = anat.describe(np.array([point], float), extra_axial=False)
    assert d == {"area": area, "left_right": lr, "front_rear": fr, "upper_lower": ul}


def test_ventricles_are_an_area(anat):
    vent = np.argwhere(np.isin(anat.cerebra, [41, 92]))  # lateral ventricles
    pts = vent @ anat.affine[:3, :3].T + anat.affine[:3, 3]
    assert anat.describe(pts[:50], extra_axial=False)["area"] == "ventricles"


def test_extra_axial_areas(anat):
    # over the right frontal convexity, outside the brain
    assert anat.describe(np.array([[30.0, 20.0, 68.0]]), extra_axial=True)["area"] == "convexity_falx"
    # under the frontal lobe (anterior cranial fossa floor)
    assert anat.describe(np.array([[20.0, 35.0, -22.0]]), extra_axial=True)["area"] == "skull_base_cpa"
    # right cerebellopontine angle
    assert anat.describe(np.array([[26.0, -27.0, -30.0]]), extra_axial=True)["area"] == "skull_base_cpa"
    # type unknown: decided by the share of points inside the brain
    assert anat.describe(np.array([[30.0, 20.0, 75.0]]))["area"] == "convexity_falx"


def test_atlas_features_are_the_label_rules_before_the_type_picks_one(anat):
    """atlas_features: each area's share of the intra-axial votes, the extra-axial rule's skull base and
    the share inside the brain; its area argmax is describe()'s intra-axial area, its flag the extra-axial one."""
    rng = np.random.default_rng(0)
    for centre, area in (((40, 30, 40), "frontal"), ((25, -65, -35), "cerebellum"), ((50, -20, -15), "temporal")):
        pts = np.asarray(centre, float) + rng.normal(0, 3, (60, 3))
        f = anat.atlas_features(pts)
        assert f.shape == (len(ATLAS_FEATURES),) and f.dtype == np.float32
        shares = f[:len(AREAS)]
        assert shares.sum() == pytest.approx(1.0) and AREAS[int(shares.argmax())] == area
        assert AREAS[int(shares.argmax())] == anat.describe(pts, extra_axial=False)["area"]
        assert f[-1] > 0.9  # deep inside the brain
    for centre, skull_base in (((30.0, 20.0, 68.0), False), ((20.0, 35.0, -22.0), True), ((26.0, -27.0, -30.0), True)):
        pts = np.asarray(centre)[None] + rng.normal(0, 1, (20, 3))
        f = anat.atlas_features(pts)
        assert f[-2] == float(skull_base)
        assert anat.describe(pts, extra_axial=True)["area"] == ("skull_base_cpa" if skull_base else "convexity_falx")
    outside = anat.atlas_features(np.array([[30.0, 20.0, 75.0], [30.0, 22.0, 76.0]]))  # above the convexity
    assert outside[-1] == 0.0 and outside[-2] == 0.0 and outside[:len(AREAS)].sum() == pytest.approx(1.0)


def test_every_brain_voxel_has_an_area(anat):
    assert anat.areas[anat.brain].min() >= 0 and anat.areas.max() < len(AREAS)
    assert set(np.unique(anat.areas[anat.brain])) == set(range(9))  # all intra-axial areas occur


def test_proportional_alignment_recovers_a_scaled_shifted_copy(anat):
    # the template brain, stored with 1.1x larger voxels and shifted: alignment maps it back
    affine = anat.affine.copy()
    affine[:3, :3] *= 1.1
    affine[:3, 3] += [7.0, -12.0, 4.0]
    align = fit_alignment(anat.t1_brain, affine, skull_stripped=True, anatomy=anat)
    vox = np.array([[60, 150, 120], [130, 60, 60]], float)
    world = vox @ affine[:3, :3].T + affine[:3, 3]
    expected = vox @ anat.affine[:3, :3].T + anat.affine[:3, 3]
    assert np.abs(align.to_template(world) - expected).max() < 1.5
