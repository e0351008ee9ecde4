import math

import numpy as np
import pytest
import torch

from tumornet.errors import InputError
from tumornet.labels import DEFAULT_SCHEMA, LabelSchema
from tumornet.network import (
    Backbone,
    MultitaskNet,
    NetConfig,
    ResBlock,
    coordinate_channels,
    grown_boxes,
    roi_mean_pool,
    roi_pool,
    shell_mean_pool,
)
from tumornet.patches import mirrored_frame, patch_frame

torch.manual_seed(0)


@pytest.mark.parametrize("channels", [16, 32])
@pytest.mark.parametrize("size", [(16, 16, 16), (17, 23, 30), (9, 5, 13), (4, 4, 4)])
def test_output_shapes_match_any_input_size(channels, size):
    net = MultitaskNet(NetConfig(channels=channels, blocks=2), DEFAULT_SCHEMA)
    x = torch.randn(2, 1, *size)
    boxes = torch.tensor([[0, 0, 0, 0, 2, 2, 2], [1, 1, 1, 1, size[0], size[1], size[2]], [1, 0, 0, 0, 1, 1, 1]])
    out = net(x, boxes)
    assert out["seg"].shape == (2, 2, *size)
    assert out["embedding"].shape == (3, channels)
    assert {k: tuple(v.shape) for k, v in out["tasks"].items()} == {
        "tumor_type": (3, 3), "area": (3, 11), "left_right": (3, 2), "front_rear": (3, 2), "upper_lower": (3, 2)}


def test_backbone_width_options():
    f = Backbone(NetConfig(channels=24, stem_channels=8, deep_channels=40, blocks=1, skip=False))(
        torch.randn(1, 1, 10, 11, 12))
    assert f.shape == (1, 24, 10, 11, 12) and (f >= 0).all()  # ends in ReLU


def test_resblock_projection_and_identity():
    assert isinstance(ResBlock(8, 8).skip, torch.nn.Identity)
    assert ResBlock(4, 8)(torch.randn(1, 4, 5, 5, 5)).shape == (1, 8, 5, 5, 5)
    head = ResBlock(8, 2, head=True)
    y = head(torch.randn(1, 8, 5, 5, 5))
    assert (y < 0).any()  # logits: no final ReLU


def test_roi_pool_equals_hand_computed_max():
    f = torch.randn(2, 3, 6, 7, 8)
    boxes = torch.tensor([[0, 1, 2, 3, 4, 5, 6], [1, 2, 0, 1, 3, 1, 2], [1, -5, -5, -5, 100, 100, 100]])
    out = roi_pool(f, boxes)
    assert torch.equal(out[0], f[0, :, 1:4, 2:5, 3:6].amax(dim=(1, 2, 3)))
    assert torch.equal(out[1], f[1, :, 2, 0, 1])  # a single voxel
    assert torch.equal(out[2], f[1].amax(dim=(1, 2, 3)))  # clipped to the whole map
    for c in range(3):  # the same max by brute force
        assert out[0, c] == max(float(v) for v in f[0, c, 1:4, 2:5, 3:6].flatten())


def test_roi_pool_rejects_boxes_outside_and_bad_shapes():
    f = torch.randn(1, 2, 4, 4, 4)
    with pytest.raises(ValueError, match="outside the feature map"):
        roi_pool(f, torch.tensor([[0, 5, 5, 5, 8, 8, 8]]))
    with pytest.raises(ValueError, match=r"boxes must be \(N, 7\)"):
        roi_pool(f, torch.tensor([[0, 0, 0, 1, 1, 1]]))
    assert roi_pool(f, torch.zeros((0, 7), dtype=torch.long)).shape == (0, 2)


def test_embedding_size_is_independent_of_box_size():
    net = MultitaskNet(NetConfig(channels=16, blocks=1), DEFAULT_SCHEMA)
    vol = torch.randn(20, 22, 24)
    emb = net.embed(vol, [[0, 0, 0, 1, 1, 1], [2, 3, 4, 10, 12, 14], [0, 0, 0, 20, 22, 24]])
    assert emb.shape == (3, 16) and net.training  # embed() restores the training mode
    # a bigger box never has a smaller max
    assert (emb[2] >= emb[1]).all() and (emb[1] >= 0).all()


def test_embed_uses_the_running_statistics_not_the_batch():
    """embed() runs in eval mode: a tumor's vector does not depend on what else is in the batch
    (in training mode batch norm would normalize by the batch and give another vector)."""
    torch.manual_seed(0)
    net = MultitaskNet(NetConfig(channels=8, blocks=1), DEFAULT_SCHEMA)
    for _ in range(3):  # give batch norm running statistics that differ from any one batch's
        net(torch.randn(2, 1, 12, 12, 12) * 3 + 1, torch.tensor([[0, 1, 1, 1, 5, 5, 5]]))
    vol = torch.randn(1, 12, 12, 12)
    box = [[1, 1, 1, 5, 5, 5]]
    emb = net.embed(vol, box)
    assert net.training and torch.equal(emb, net.embed(vol, box))
    boxes = torch.tensor([[0, 1, 1, 1, 5, 5, 5]])
    with torch.no_grad():
        net.eval()
        assert torch.allclose(emb, net(vol[None], boxes)["embedding"], atol=1e-6)
        net.train()  # what a train-mode embedding would have given
        assert not torch.allclose(emb, net(vol[None], boxes)["embedding"], atol=1e-3)


def test_task_heads_follow_the_schema():
    schema = LabelSchema.from_dict({"tumor_type": ["a", "b"], "grade": ["1", "2", "3", "4"]})
    net = MultitaskNet(NetConfig(channels=8, blocks=1), schema)
    out = net(torch.randn(1, 1, 8, 8, 8), torch.tensor([[0, 0, 0, 0, 4, 4, 4]]))
    assert set(out["tasks"]) == {"tumor_type", "grade"} and out["tasks"]["grade"].shape == (1, 4)


def test_config_errors():
    with pytest.raises(InputError, match=r"model\.norm"):
        NetConfig(norm="layer")
    with pytest.raises(InputError, match="channels and blocks"):
        NetConfig(channels=0)
    with pytest.raises(InputError, match=r"model\.seg_prior: expected a probability in \[0, 1\), got 1\.5"):
        NetConfig(seg_prior=1.5)


def test_roi_pool_gradient_matches_autograd_of_slicing():
    f = torch.randn(2, 4, 6, 7, 8, dtype=torch.float64, requires_grad=True)
    boxes = torch.tensor([[0, 1, 2, 3, 4, 5, 6], [1, 0, 0, 0, 6, 7, 8], [0, 2, 2, 2, 5, 6, 7]])
    g = torch.randn(3, 4, dtype=torch.float64)
    (roi_pool(f, boxes) * g).sum().backward()
    ours = f.grad.clone()
    f.grad = None
    ref = torch.stack([f[b, :, x0:x1, y0:y1, z0:z1].amax(dim=(1, 2, 3))
                       for b, x0, y0, z0, x1, y1, z1 in boxes.tolist()])
    (ref * g).sum().backward()
    assert torch.allclose(ours, f.grad)
    assert torch.autograd.gradcheck(lambda t: roi_pool(t, boxes), (f.detach().requires_grad_(),))


def test_channels_last_and_contiguous_nets_agree():
    torch.manual_seed(3)
    a = MultitaskNet(NetConfig(channels=8, blocks=1, channels_last=True), DEFAULT_SCHEMA).eval()
    b = MultitaskNet(NetConfig(channels=8, blocks=1, channels_last=False), DEFAULT_SCHEMA).eval()
    b.load_state_dict(a.state_dict())
    x, boxes = torch.randn(1, 1, 10, 12, 14), torch.tensor([[0, 1, 2, 3, 6, 7, 8]])
    oa, ob = a(x, boxes), b(x, boxes)
    assert torch.allclose(oa["seg"], ob["seg"], atol=1e-5)
    assert torch.allclose(oa["embedding"], ob["embedding"], atol=1e-5)


@pytest.mark.gpu
def test_bf16_training_step_on_gpu():
    from tumornet.loss import LossWeights, as_float32, multitask_loss

    torch.manual_seed(0)
    net = MultitaskNet(NetConfig(channels=16, blocks=1), DEFAULT_SCHEMA).cuda()
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    x = torch.randn(2, 1, 32, 32, 32, device="cuda")
    seg = torch.zeros(2, 32, 32, 32, dtype=torch.long, device="cuda")
    seg[:, 10:16, 10:16, 10:16] = 1
    x[seg[:, None] == 1] += 3
    boxes = torch.tensor([[0, 10, 10, 10, 16, 16, 16], [1, 10, 10, 10, 16, 16, 16]])
    labels = {t: torch.tensor([0, 1], device="cuda") for t in DEFAULT_SCHEMA.names}
    losses = []
    for _ in range(20):
        opt.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = net(x, boxes)
        t = multitask_loss(as_float32(out), seg, labels, LossWeights(task=0.1))
        t["total"].backward()
        opt.step()
        losses.append(float(t["total"]))
    assert out["seg"].dtype == torch.bfloat16 and losses[-1] < losses[0] / 2


@pytest.mark.parametrize("seg_classes", [2, 4])
def test_segmentation_starts_at_the_tumor_prior(seg_classes):
    torch.manual_seed(0)
    x = torch.randn(2, 1, 16, 16, 16)
    p = {}
    for prior in (0.0, 0.01):
        net = MultitaskNet(NetConfig(channels=8, blocks=1, seg_classes=seg_classes, seg_prior=prior), DEFAULT_SCHEMA)
        with torch.no_grad():
            p[prior] = 1 - float(net(x, torch.tensor([[0, 2, 2, 2, 9, 9, 9]]))["seg"].softmax(1)[:, 0].mean())
    bias = net.seg_head.conv2.bias
    expected = math.log(0.01 / (seg_classes - 1) / 0.99)
    assert float(bias[0]) == 0 and torch.allclose(bias[1:], torch.full((seg_classes - 1,), expected))
    assert float(net.seg_head.skip.bias.abs().max()) == 0
    assert p[0.01] < 0.05 < 0.3 < p[0.0]  # tumor probability at the start: about the prior vs about uniform


def test_coordinate_channels_follow_the_frame_and_its_mirror():
    frame = patch_frame([2, 3, 4], (np.array([10.0, 10.0, 10.0]), np.array([5.0, 10.0, 20.0])))
    c = coordinate_channels(torch.from_numpy(np.stack([frame, mirrored_frame(frame, 6)])), (6, 7, 8))
    assert c.shape == (2, 3, 6, 7, 8)
    i, j, k = 4, 5, 6
    assert c[0, :, i, j, k].tolist() == pytest.approx([(2 + i - 10) / 5, (3 + j - 10) / 10, (4 + k - 10) / 20])
    # the flipped patch's voxel i is the original's voxel 5 - i, mirrored (x -> -x)
    assert torch.allclose(c[1, 0], -c[0, 0].flip(0)) and torch.equal(c[1, 1:], c[0, 1:])


def test_a_network_with_coordinates_reads_the_frame():
    torch.manual_seed(0)
    net = MultitaskNet(NetConfig(channels=8, blocks=1, coords=True), DEFAULT_SCHEMA).eval()
    assert net.backbone.stem[0][0].in_channels == 4
    x, boxes = torch.randn(1, 1, 12, 12, 12), torch.tensor([[0, 2, 2, 2, 8, 8, 8]])
    with pytest.raises(ValueError, match="coordinate channels"):
        net(x, boxes)
    left = torch.tensor([[-0.8, 0.0, 0.0, 0.05, 0.05, 0.05]])
    right = torch.tensor([[0.2, 0.0, 0.0, 0.05, 0.05, 0.05]])
    a, b = net(x, boxes, left)["embedding"], net(x, boxes, right)["embedding"]
    assert not torch.allclose(a, b, atol=1e-4)  # the same image elsewhere in the head: another vector
    assert torch.allclose(a, net.embed(x[0], boxes[:, 1:], left[0]), atol=1e-6)


def test_mean_and_shell_pooling_equal_hand_computed_means():
    torch.manual_seed(0)
    f = torch.randn(2, 3, 12, 12, 12)
    boxes = torch.tensor([[0, 4, 4, 4, 8, 6, 8], [1, 0, 0, 0, 2, 2, 2]])
    assert torch.allclose(roi_mean_pool(f, boxes), torch.stack([f[0, :, 4:8, 4:6, 4:8].mean((1, 2, 3)),
                                                                f[1, :, 0:2, 0:2, 0:2].mean((1, 2, 3))]))
    # grown by half the size per side, at least 2 voxels: (4, 2, 4) -> pad (2, 2, 2); clipped at 0 on the second
    assert grown_boxes(boxes).tolist() == [[0, 2, 2, 2, 10, 8, 10], [1, -2, -2, -2, 4, 4, 4]]
    shell = shell_mean_pool(f, boxes)
    for n, ((b, *lo_hi), (_, *g)) in enumerate(zip(boxes.tolist(), grown_boxes(boxes).tolist(), strict=True)):
        keep = torch.zeros(12, 12, 12, dtype=torch.bool)
        keep[max(g[0], 0):g[3], max(g[1], 0):g[4], max(g[2], 0):g[5]] = True
        keep[lo_hi[0]:lo_hi[3], lo_hi[1]:lo_hi[4], lo_hi[2]:lo_hi[5]] = False
        assert torch.allclose(shell[n], f[b][:, keep].mean(1), atol=1e-6)
    whole = torch.tensor([[0, 0, 0, 0, 12, 12, 12]])  # no room for a shell: zeros
    assert torch.equal(shell_mean_pool(f, whole), torch.zeros(1, 3))
    assert roi_mean_pool(f, torch.zeros((0, 7), dtype=torch.long)).shape == (0, 3)
