import numpy as np
import pytest

from tumornet.boxes import make_box
from tumornet.labels import MISSING
from tumornet.patches import Augment, TumorBox, collate, crop, make_sample, patch_frame, patch_origin
from tumornet.volumes import head_box_voxels

TASKS = ("tumor_type", "left_right")


def _scan():
    image = np.random.default_rng(0).normal(0, 1, (40, 36, 30)).astype(np.float32)
    inst = np.zeros(image.shape, np.int32)
    inst[5:11, 6:10, 4:9] = 1
    inst[30:34, 28:33, 20:26] = 2
    tumors = [TumorBox(tumor_id=1, bbox=make_box([5, 6, 4], [11, 10, 9]), labels={"tumor_type": 0, "left_right": 1}),
              TumorBox(tumor_id=2, bbox=make_box([30, 28, 20], [34, 33, 26]), labels={"tumor_type": 2})]
    return image, inst, tumors


@pytest.mark.parametrize("seed", range(20))
def test_patch_contains_the_whole_chosen_tumor(seed):
    image, inst, tumors = _scan()
    rng = np.random.default_rng(seed)
    s = make_sample(image, inst, tumors, 1, 16, rng, TASKS)
    assert s.image.shape == (1, 16, 16, 16) and s.seg.shape == (16, 16, 16)
    assert s.seg.sum() == (inst == 2).sum()  # every voxel of tumor 2 is in the patch
    (i,) = np.flatnonzero(s.labels["tumor_type"] == 2)
    assert (s.boxes[i][3:] - s.boxes[i][:3]).tolist() == [4, 5, 6]
    assert s.labels["left_right"][i] == MISSING


def test_tumor_larger_than_patch_is_centred_and_clipped():
    image, inst, tumors = _scan()
    s = make_sample(image, inst, tumors, 0, 4, None, TASKS)
    assert s.boxes.tolist() == [[0, 0, 0, 4, 4, 4]]


def test_lr_flip_swaps_left_right_label_and_mirrors_image_seg_and_boxes():
    image, inst, tumors = _scan()
    flips = 0
    for seed in range(12):
        kw = {"intensity_scale": 0.0, "intensity_shift": 0.0}
        same = make_sample(image, inst, tumors, 0, 20, np.random.default_rng(seed), TASKS, Augment(flip_lr=False, **kw))
        s = make_sample(image, inst, tumors, 0, 20, np.random.default_rng(seed), TASKS, Augment(flip_lr=True, **kw))
        if s.labels["left_right"][0] == 0:  # flipped: right (1) became left (0)
            flips += 1
            assert np.array_equal(s.seg, same.seg[::-1]) and np.array_equal(s.image, same.image[:, ::-1])
            lo, hi = same.boxes[0][0], same.boxes[0][3]
            assert s.boxes[0].tolist() == [20 - hi, *same.boxes[0][1:3], 20 - lo, *same.boxes[0][4:6]]
            # the mirror image of the head: x -> -x, the patch's first voxel is the old last one
            assert s.frame[0] == pytest.approx(-(same.frame[0] + 19 * same.frame[3]))
            assert np.array_equal(s.frame[1:], same.frame[1:])
        else:
            assert np.array_equal(s.seg, same.seg) and np.array_equal(s.boxes, same.boxes)
            assert np.array_equal(s.frame, same.frame)
        assert s.labels["tumor_type"][0] == 0
        mask_x = np.argwhere(s.seg > 0)[:, 0]
        assert s.boxes[0][0] == mask_x.min() and s.boxes[0][3] == mask_x.max() + 1
    assert 0 < flips < 12


def test_crop_pads_outside_with_fill():
    a = np.arange(27, dtype=np.float32).reshape(3, 3, 3)
    c = crop(a, (-1, -1, -1), 3, -5.0)
    assert c[0, 0, 0] == -5.0 and c[1, 1, 1] == a[0, 0, 0] and c[2, 2, 2] == a[1, 1, 1]


def test_patch_origin_prefers_inside_the_volume():
    o = patch_origin(make_box([0, 0, 0], [2, 2, 2]), (50, 50, 50), 10, np.random.default_rng(0))
    assert (o >= 0).all() and (o <= 0).all()  # the only origin keeping box and patch inside is 0


def test_collate_adds_batch_index():
    image, inst, tumors = _scan()
    a = make_sample(image, inst, tumors, 0, 16, None, TASKS)
    b = make_sample(image, inst, tumors, 1, 16, None, TASKS)
    batch = collate([a, b])
    assert batch["image"].shape == (2, 1, 16, 16, 16)
    assert batch["boxes"][:, 0].tolist() == [0] * len(a.boxes) + [1] * len(b.boxes)
    assert len(batch["labels"]["tumor_type"]) == len(batch["boxes"])


def test_a_patch_anywhere_holds_only_whole_tumors_and_trains_without_boxes():
    """train.background_fraction: patches anywhere in the scan, most without a tumor; a batch without
    any box still gives a finite loss (segmentation only) and gradients."""
    import torch

    from tumornet.labels import DEFAULT_SCHEMA
    from tumornet.loss import multitask_loss
    from tumornet.network import MultitaskNet, NetConfig

    image, inst, tumors = _scan()
    kinds = {"none": 0, "some": 0}
    for seed in range(40):
        s = make_sample(image, inst, tumors, None, 16, np.random.default_rng(seed), TASKS, Augment(box_jitter=True))
        assert s.image.shape == (1, 16, 16, 16) and len(s.boxes) == len(s.labels["tumor_type"])
        for b, t in zip(s.boxes, s.labels["tumor_type"], strict=True):  # a box only for a tumor wholly inside
            assert t in (0, 2) and np.all(b[3:] > b[:3])
        kinds["some" if len(s.boxes) else "none"] += 1
    assert kinds["none"] > 0 and kinds["some"] > 0
    empty = [make_sample(image, inst, tumors, None, 16, np.random.default_rng(seed), TASKS) for seed in range(40)]
    empty = [s for s in empty if len(s.boxes) == 0][:2]
    batch = collate(empty)
    assert batch["boxes"].shape == (0, 7)
    model = MultitaskNet(NetConfig(channels=8, blocks=1), DEFAULT_SCHEMA)
    out = model(torch.from_numpy(batch["image"]), torch.from_numpy(batch["boxes"]))
    labels = {k: torch.from_numpy(v) for k, v in batch["labels"].items()}
    loss = multitask_loss(out, torch.from_numpy(batch["seg"]), labels)
    loss["total"].backward()
    assert torch.isfinite(loss["total"]) and float(loss["total"]) == pytest.approx(float(loss["seg"]))
    assert model.seg_head.conv2.weight.grad is not None


def test_a_patch_frame_places_its_voxels_in_the_head():
    image, inst, tumors = _scan()
    head = (np.array([20.0, 18.0, 15.0]), np.array([10.0, 9.0, 5.0]))
    s = make_sample(image, inst, tumors, 1, 16, None, TASKS, head=head)
    origin = patch_origin(tumors[1].bbox, image.shape, 16, None)
    assert s.frame.dtype == np.float32
    assert np.allclose(s.frame, [*((origin - head[0]) / head[1]), 0.1, 1 / 9, 0.2])
    assert np.allclose(patch_frame([20, 18, 15], head)[:3], 0.0)  # the head's centre is 0
    assert np.allclose(collate([s, s])["frame"], [s.frame, s.frame])
    # no head given: the scan's own head box (volumes.head_box_voxels)
    assert np.allclose(make_sample(image, inst, tumors, 1, 16, None, TASKS).frame,
                       patch_frame(origin, head_box_voxels(image)))
