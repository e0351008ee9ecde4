"""Affine registration onto the template: a tilted, scaled, shifted copy of the template comes back
to template coordinates, better than the head-box alignment it starts from."""

import numpy as np
import pytest
from scipy import ndimage

from tumornet.anatomy import fit_alignment, load_anatomy
from tumornet.boxes import mm_to_voxel, voxel_to_mm
from tumornet.register import register
from tumornet.synth.lesions import rotation_matrix


def _tilted_template(spacing=3.0, degrees=(7.0, -5.0, 6.0), scale=(1.06, 0.95, 1.03), shift=(9.0, -6.0, 12.0),
                     skull_stripped=False):
    """The template T1 seen by a scanner: world = M template + b (a tilt, a head of another size and a
    shift), sampled on an axis-aligned grid of `spacing` mm -> (image, affine, template -> world map)."""
    m = rotation_matrix(np.deg2rad(degrees)) @ np.diag(scale)
    b = np.asarray(shift)
    affine, q = _scanner_grid(spacing, m, b)
    anat = load_anatomy()
    image = _sample_template(anat.t1_brain if skull_stripped else anat.t1, q)
    return image, affine, lambda t: np.asarray(t) @ m.T + b


def _scanner_grid(spacing: float, m: np.ndarray, b) -> tuple[np.ndarray, np.ndarray]:
    """An axis-aligned grid of `spacing` mm around the template seen at world = m template + b ->
    (its affine, the template point of each voxel (D, H, W, 3))."""
    shape = tuple(int(np.ceil(n * 1.15 / spacing)) for n in load_anatomy().shape)
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = np.asarray(b) - (np.asarray(shape) - 1) / 2.0 * spacing
    world = voxel_to_mm(np.indices(shape).reshape(3, -1).T, affine)
    return affine, ((world - b) @ np.linalg.inv(m).T).reshape(*shape, 3)


def _sample_template(ref: np.ndarray, q: np.ndarray) -> np.ndarray:
    v = mm_to_voxel(q.reshape(-1, 3), load_anatomy().affine)
    return ndimage.map_coordinates(ref, v.T, order=1, cval=0.0).reshape(q.shape[:3]).astype(np.float32)


def test_a_tilted_template_is_brought_back_to_template_space():
    image, affine, to_world = _tilted_template()
    frame = register(image, affine)
    anat = load_anatomy()
    brain_mm = voxel_to_mm(np.argwhere(anat.brain)[::500], anat.affine)  # check points: the brain
    vox = mm_to_voxel(to_world(brain_mm), affine)  # where the scan holds them
    err = np.linalg.norm(frame.template_mm(vox) - brain_mm, axis=1)
    # the head-box alignment the registration starts from: per-axis scale and shift of the foreground box
    box = fit_alignment(image, affine, skull_stripped=False, anatomy=anat)
    box_err = np.linalg.norm(box.to_template(voxel_to_mm(vox, affine)) - brain_mm, axis=1)
    assert err.mean() < 1.0 and np.percentile(err, 95) < 2.0  # measured: 0.48 and 1.11 mm
    assert box_err.mean() > 4.0  # measured: 9 mm: the tilt is what the head box cannot undo
    # positions: the template brain spans [-1, 1] per axis around the labels' reference
    pos = frame.position(vox)
    assert np.all(np.abs(pos) < 1.15) and np.abs(pos).max() > 0.85


def test_a_tilted_skull_stripped_scan_registers_onto_the_skull_stripped_template():
    """BraTS-like input (no skull): register(skull_stripped=True) fits it to the template's brain."""
    image, affine, to_world = _tilted_template(spacing=3.0, degrees=(-6.0, 4.0, 5.0), skull_stripped=True)
    frame = register(image, affine, skull_stripped=True)
    anat = load_anatomy()
    brain_mm = voxel_to_mm(np.argwhere(anat.brain)[::500], anat.affine)
    err = np.linalg.norm(frame.template_mm(mm_to_voxel(to_world(brain_mm), affine)) - brain_mm, axis=1)
    assert err.mean() < 1.0 and np.percentile(err, 95) < 2.0  # measured: 0.06 and 0.10 mm


def test_the_atlas_reads_a_box_of_the_tilted_scan_where_the_template_holds_it():
    """TemplateFrame.atlas: a box drawn in the scan around template points of one area is read as that
    area (the label rules, anatomy.atlas_features), through the registration."""
    from tumornet.anatomy import ATLAS_FEATURES
    from tumornet.boxes import make_box
    from tumornet.labels import AREAS

    image, affine, to_world = _tilted_template()
    frame = register(image, affine)
    for point, area in (((40, 30, 40), "frontal"), ((25, -65, -35), "cerebellum"), ((50, -20, -15), "temporal")):
        c = mm_to_voxel(to_world(np.asarray(point, float)[None]), affine)[0]
        f = frame.atlas(make_box(np.floor(c - 2), np.floor(c + 3)))  # a 15 mm box at 3 mm
        assert f.shape == (len(ATLAS_FEATURES),) and AREAS[int(f[:len(AREAS)].argmax())] == area
        assert f[-1] > 0.9  # inside the brain


def test_registration_does_not_depend_on_the_grid_origin():
    """The training cache keeps no origin (its scans register with a diagonal affine): a shifted
    origin moves the world, not the voxels' place in the template."""
    image, affine, _ = _tilted_template(spacing=4.0)
    a = register(image, affine)
    b = register(image, np.diag([4.0, 4.0, 4.0, 1.0]))
    assert register(image, affine) is a and b is not a  # the same scan again reuses its fit
    vox = np.argwhere(image > image.mean())[::300]
    assert np.abs(a.position(vox) - b.position(vox)).max() == pytest.approx(0.0, abs=0.02)


def test_a_lattice_of_template_points_fits_as_every_point_does(monkeypatch):
    """register.POINT_EVERY keeps a quarter of the 4 mm points and half the 8 mm ones (2.6x faster
    fits): the fit moves by a fraction of a millimetre from the fit on every point."""
    import tumornet.register as reg

    image, affine, _ = _tilted_template()
    anat = load_anatomy()
    vox = mm_to_voxel(voxel_to_mm(np.argwhere(anat.brain)[::500], anat.affine), affine)
    lattice = reg._register(image, affine, cache_dir=None, skull_stripped=False)
    monkeypatch.setattr(reg, "POINT_EVERY", (1, 1))
    reg._template.cache_clear()
    try:
        assert reg._template(None, False)[0][1][0].shape[0] > 3.5 * 21000  # every 4 mm point
        dense = reg._register(image, affine, cache_dir=None, skull_stripped=False)
    finally:
        reg._template.cache_clear()
    diff = np.linalg.norm(lattice.template_mm(vox) - dense.template_mm(vox), axis=1)
    assert diff.max() < 0.5  # measured: 0.11 mm


def test_the_fit_settings_decide_an_embedding_only_where_the_recipe_reads_the_template(monkeypatch):
    """Changed registration settings embed an atlas-frame archive again (its fingerprint changes), not
    a head-frame one."""
    import tumornet.register as reg
    from embedder import embed
    from tumornet.detect import DetectConfig
    from tumornet.recipe import RetrievalConfig

    atlas = (RetrievalConfig(position=1.0, position_frame="atlas"), {})
    head = (RetrievalConfig(position=1.0, position_frame="head"), {})
    before = [embed.settings_fingerprint(2.0, 64, r, DetectConfig()) for r in (atlas, head)]
    monkeypatch.setattr(embed, "FIT_SETTINGS", reg.FIT_SETTINGS | {"steps": (10, 10)})
    after = [embed.settings_fingerprint(2.0, 64, r, DetectConfig()) for r in (atlas, head)]
    assert before[0] != after[0] and before[1] == after[1]


def _warped_template(spacing=3.0, amplitude=6.0, seed=3):
    """The tilted template of another brain: the scan at world w shows template point q(w) + f(q(w)),
    f a smooth random displacement of `amplitude` mm (as the phantom's template_warp_mm) -> (image,
    affine, the template point each voxel shows (D, H, W, 3))."""
    from tumornet.synth.lesions import smooth_field

    m = rotation_matrix(np.deg2rad((5.0, -4.0, 3.0))) @ np.diag((1.04, 0.97, 1.02))
    affine, q = _scanner_grid(spacing, m, (6.0, -4.0, 8.0))
    rng = np.random.default_rng(seed)
    q = q + np.stack([smooth_field(q.shape[:3], rng, control=4, amplitude=amplitude) for _ in range(3)], -1)
    return _sample_template(load_anatomy().t1, q), affine, q


def test_the_deformable_stage_reads_a_brain_unlike_the_template_where_the_affine_map_cannot():
    """register(warp_mm=24): a brain whose parts sit millimetres away from the template's (a smooth
    deformation no affine map removes) comes back to template space with a fraction of the affine
    registration's error (a fifth here: a template without noise or tumor), and the same settings
    again reuse the fit."""
    import tumornet.register as reg

    image, affine, q = _warped_template()
    brain = np.argwhere(image > np.percentile(image, 70))[::40]
    truth = q[tuple(brain.T)]
    affine_only = reg._register(image, affine, cache_dir=None, skull_stripped=False)
    warped = register(image, affine, warp_mm=24)
    assert affine_only.warp is None and warped.warp.shape[0] == 3
    err_affine = np.linalg.norm(affine_only.template_mm(brain) - truth, axis=1).mean()
    err_warp = np.linalg.norm(warped.template_mm(brain) - truth, axis=1).mean()
    assert err_affine > 5.0  # measured: 7.5 mm
    assert err_warp < 0.4 * err_affine  # measured: 1.4 mm
    assert register(image, affine, warp_mm=24) is warped and register(image, affine) is not warped


def test_the_deformation_is_inverted_where_the_scan_is_read():
    """TemplateFrame.template_mm inverts t -> t + u(t) (fixed point): the template points a fitted
    deformation sends into the scan come back to themselves within a fraction of a millimetre."""
    image, affine, _ = _warped_template(spacing=4.0)
    frame = register(image, affine, warp_mm=24)
    anat = load_anatomy()
    t = voxel_to_mm(np.argwhere(anat.brain)[::700], anat.affine)
    assert np.abs(frame.displacement(t)).max() > 5.0  # a real deformation (measured: 15 mm at most)
    # template -> the affine frame's mm (t + u(t)) -> scan voxels -> back
    y = t + frame.displacement(t)
    vox = mm_to_voxel(y, frame.voxel_to_template)
    assert np.linalg.norm(frame.template_mm(vox) - t, axis=1).max() < 0.5  # measured: 0.22 mm


def test_a_warping_recipe_is_validated_and_decides_the_embedding(monkeypatch):
    """retrieval.warp_mm: 0 or a spacing >= 8 mm (else an error naming the key); a recipe that warps
    gets another settings fingerprint, so its archive is embedded again, and the deformable stage's
    settings decide it as the affine stage's do."""
    from test_descriptor import _keeps_older_fingerprints

    import tumornet.register as reg
    from embedder import embed
    from tumornet.detect import DetectConfig
    from tumornet.errors import InputError
    from tumornet.recipe import RetrievalConfig

    for bad in (4, -1, True, "24"):
        with pytest.raises(InputError, match=r"retrieval\.warp_mm"):
            RetrievalConfig(position=1.0, position_frame="atlas", warp_mm=bad)

    def fingerprint(**kw):
        return embed.settings_fingerprint(2.0, 64, (RetrievalConfig(position=1.0, position_frame="atlas", **kw), {}),
                                          DetectConfig())

    _keeps_older_fingerprints("warp_mm", 0.0, 24)  # archives embedded before the key stay valid
    affine, warped = fingerprint(), fingerprint(warp_mm=24)
    assert fingerprint(warp_mm=0.0) == affine != warped != fingerprint(warp_mm=32)
    monkeypatch.setattr(embed, "WARP_SETTINGS", reg.WARP_SETTINGS | {"smooth": 1.0})
    assert fingerprint(warp_mm=24) != warped and fingerprint() == affine


def test_a_tumor_left_out_of_the_similarity_no_longer_pulls_the_fit_around_it():
    """register(ignore=[box]): a bright tumor of 30 mm (not in the template) pulls the deformable fit
    around it; leaving its box out of the similarity brings the brain next to it back to template
    space nearly as well as the scan without the tumor; the boxes are part of what a fit is reused for."""
    image, affine, q = _warped_template()
    centre = np.asarray(image.shape) // 2 + np.array([12, 8, 6])
    dist = np.linalg.norm((np.indices(image.shape) - centre[:, None, None, None]) * 3.0, axis=0)
    tumor = image.copy()
    tumor[dist < 15.0] = image.max() * 1.2
    box = np.r_[centre - 5, centre + 6]  # 33 mm around it
    near = np.argwhere((dist > 18.0) & (dist < 30.0) & (image > np.percentile(image, 50)))  # the brain beside it

    def error(frame):
        return np.linalg.norm(frame.template_mm(near) - q[tuple(near.T)], axis=1).mean()

    pulled, skipped = register(tumor, affine, warp_mm=24), register(tumor, affine, warp_mm=24, ignore=[box])
    clean = error(register(image, affine, warp_mm=24))
    assert error(pulled) > 2.0 and error(pulled) > 2.0 * clean  # measured: 2.4 mm, 0.8 without the tumor
    assert error(skipped) < 0.6 * error(pulled)  # measured: 1.2 mm
    assert register(tumor, affine, warp_mm=24, ignore=[box]) is skipped is not pulled


def test_a_recipe_that_skips_the_tumors_is_validated_and_decides_the_embedding():
    """retrieval.frame_skips_tumors: true or false (else an error naming the key); a recipe that
    skips them gets another settings fingerprint, the archives embedded before keep theirs."""
    from test_descriptor import _keeps_older_fingerprints

    from embedder import embed
    from tumornet.detect import DetectConfig
    from tumornet.errors import InputError
    from tumornet.recipe import RetrievalConfig

    for bad in (1, "yes", None):
        with pytest.raises(InputError, match=r"retrieval\.frame_skips_tumors"):
            RetrievalConfig(position=1.0, position_frame="atlas", frame_skips_tumors=bad)
    _keeps_older_fingerprints("frame_skips_tumors", False, True)

    def fingerprint(**kw):
        return embed.settings_fingerprint(2.0, 64, (RetrievalConfig(position=1.0, position_frame="atlas", **kw), {}),
                                          DetectConfig())

    assert fingerprint(frame_skips_tumors=False) == fingerprint() != fingerprint(frame_skips_tumors=True)
