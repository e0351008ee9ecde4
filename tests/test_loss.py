import pytest
import torch
import torch.nn.functional as F

from tumornet.errors import InputError
from tumornet.labels import DEFAULT_SCHEMA, MISSING
from tumornet.loss import LossWeights, multitask_loss, soft_dice_loss
from tumornet.network import MultitaskNet, NetConfig

SIZE = (12, 12, 12)


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 1, *SIZE, generator=g)
    seg = torch.zeros(2, *SIZE, dtype=torch.long)
    seg[0, 2:6, 2:6, 2:6] = 1
    seg[1, 6:10, 5:9, 1:4] = 1
    x[seg[:, None] == 1] += 3.0
    boxes = torch.tensor([[0, 2, 2, 2, 6, 6, 6], [1, 6, 5, 1, 10, 9, 4]])
    labels = {"tumor_type": torch.tensor([0, 2]), "area": torch.tensor([3, MISSING]),
              "left_right": torch.tensor([0, 1]), "front_rear": torch.tensor([MISSING, MISSING]),
              "upper_lower": torch.tensor([1, 0])}
    return x, seg, boxes, labels


def _net(seed=0):
    torch.manual_seed(seed)
    return MultitaskNet(NetConfig(channels=8, blocks=1), DEFAULT_SCHEMA)


def test_terms_and_weighted_total():
    net = _net()
    x, seg, boxes, labels = _batch()
    out = net(x, boxes)
    w = LossWeights(seg=0.5, task=0.1, per_task={"area": 2.0})
    t = multitask_loss(out, seg, labels, w)
    assert set(t) == {"seg", "total", *(f"task/{n}" for n in DEFAULT_SCHEMA.names)}
    assert torch.allclose(t["seg"], F.cross_entropy(out["seg"], seg))
    ce = F.cross_entropy(out["tasks"]["tumor_type"], labels["tumor_type"], reduction="sum")
    assert torch.allclose(t["task/tumor_type"], ce)  # summed over tumors
    area = F.cross_entropy(out["tasks"]["area"][:1], labels["area"][:1], reduction="sum")  # tumor 2 missing
    assert torch.allclose(t["task/area"], area)
    expected = 0.5 * t["seg"] + 2.0 * t["task/area"] + 0.1 * sum(
        t[f"task/{n}"] for n in DEFAULT_SCHEMA.names if n != "area")
    assert torch.allclose(t["total"], expected)
    assert t["task/front_rear"].item() == 0.0


def test_all_labels_missing_equals_lambda_s_times_seg_loss():
    net = _net()
    x, seg, boxes, labels = _batch()
    none = {k: torch.full_like(v, MISSING) for k, v in labels.items()}
    out = net(x, boxes)
    t = multitask_loss(out, seg, none, LossWeights(seg=0.7, task=1.0))
    assert torch.allclose(t["total"], 0.7 * t["seg"])
    t2 = multitask_loss(out, seg, {}, LossWeights(seg=0.7, task=1.0))  # absent tasks are missing too
    assert torch.allclose(t2["total"], 0.7 * t2["seg"])


def test_masked_labels_give_exactly_zero_gradient_to_their_head():
    net = _net()
    x, seg, boxes, labels = _batch()
    out = net(x, boxes)
    multitask_loss(out, seg, labels, LossWeights(task=1.0))["total"].backward()
    fr = net.task_heads["front_rear"]  # every front_rear label is missing
    assert torch.count_nonzero(fr.weight.grad) == 0 and torch.count_nonzero(fr.bias.grad) == 0
    assert torch.count_nonzero(net.task_heads["tumor_type"].weight.grad) > 0
    # the masked tumor (area of tumor 2) adds nothing: same gradient as dropping it by hand
    net.zero_grad()
    out = net(x, boxes)
    F.cross_entropy(out["tasks"]["area"][:1], labels["area"][:1], reduction="sum").backward()
    g_by_hand = net.task_heads["area"].weight.grad.clone()
    net.zero_grad()
    out = net(x, boxes)
    multitask_loss(out, seg, {"area": labels["area"]}, LossWeights(seg=0.0, task=1.0))["total"].backward()
    assert torch.allclose(net.task_heads["area"].weight.grad, g_by_hand)


@pytest.mark.slow
def test_the_net_overfits_a_tiny_batch():
    net = _net(1)
    x, seg, boxes, labels = _batch()
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    w = LossWeights(seg=1.0, task=0.1)
    first = None
    for _ in range(40):
        opt.zero_grad()
        t = multitask_loss(net(x, boxes), seg, labels, w)
        t["total"].backward()
        opt.step()
        first = first if first is not None else {k: v.item() for k, v in t.items()}
    last = {k: v.item() for k, v in t.items()}
    assert last["total"] < first["total"] / 4
    assert last["seg"] < first["seg"] / 3
    assert last["task/tumor_type"] < first["task/tumor_type"] / 4


def test_soft_dice_term():
    seg = torch.zeros(1, 6, 6, 6, dtype=torch.long)
    seg[0, 1:3, 1:3, 1:3] = 1  # 8 tumor voxels of 216
    sure = torch.stack([torch.where(seg[0] > 0, -20.0, 20.0), torch.where(seg[0] > 0, 20.0, -20.0)])[None]
    assert soft_dice_loss(sure, seg).item() == pytest.approx(0.0, abs=1e-6)
    assert soft_dice_loss(-sure, seg).item() == pytest.approx(1.0 - 1.0 / (208 + 8 + 1), abs=1e-4)  # all wrong
    nothing = torch.zeros_like(seg)
    assert soft_dice_loss(torch.stack([torch.full((6, 6, 6), 20.0), torch.full((6, 6, 6), -20.0)])[None],
                          nothing).item() == pytest.approx(0.0, abs=1e-6)  # no tumor, none predicted
    # unlike CE averaged over voxels, it weighs the few tumor voxels: a tumor called background costs
    # most of the term, while CE spreads it over the background's 208 voxels too
    net = _net()
    x, seg2, boxes, labels = _batch()
    out = net(x, boxes)
    plain = multitask_loss(out, seg2, labels)
    with_dice = multitask_loss(out, seg2, labels, LossWeights(seg_dice=0.5))
    assert "seg_dice" not in plain and torch.allclose(with_dice["seg_dice"], soft_dice_loss(out["seg"], seg2))
    assert torch.allclose(with_dice["total"], plain["total"] + 0.5 * with_dice["seg_dice"])
    logits = torch.zeros(1, 2, 6, 6, 6, requires_grad=True)
    soft_dice_loss(logits, seg).backward()
    tumor_grad = logits.grad[0, 1][seg[0] > 0]
    assert (tumor_grad < 0).all()  # descending the term raises the tumor logit inside the tumor
    with pytest.raises(InputError, match=r"loss\.seg_dice: must be >= 0, got -1\.0"):
        LossWeights(seg_dice=-1.0)
