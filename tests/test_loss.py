import math

import pytest
import torch
import torch.nn.functional as F

from trainer.loop import make_optimizer
from tumornet.config import TrainConfig
from tumornet.errors import InputError
from tumornet.labels import DEFAULT_SCHEMA, MISSING
from tumornet.loss import (
    EmbeddingBank,
    LossWeights,
    multitask_loss,
    per_tumor_dice_loss,
    soft_dice_loss,
    supervised_contrastive_loss,
)
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
@pytest.mark.parametrize("optimizer,lr", [("sgd", 0.05), ("adamw", 0.003)])
def test_the_net_overfits_a_tiny_batch(optimizer, lr):
    """Both of train.optimizer's choices (trainer.loop.make_optimizer) fit a tiny batch in 40 steps."""
    net = _net(1)
    x, seg, boxes, labels = _batch()
    opt = make_optimizer(net, TrainConfig(optimizer=optimizer, lr=lr))
    assert isinstance(opt, {"sgd": torch.optim.SGD, "adamw": torch.optim.AdamW}[optimizer])
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


def test_per_tumor_dice_term_counts_every_tumor_the_same():
    seg = torch.zeros(1, 16, 16, 16, dtype=torch.long)
    seg[0, 1:9, 1:9, 1:9] = 1  # a big tumor (512 voxels)
    seg[0, 12:14, 12:14, 12:14] = 1  # a small one (8 voxels)
    boxes = torch.tensor([[0, 1, 1, 1, 9, 9, 9], [0, 12, 12, 12, 14, 14, 14]])
    only_big = torch.zeros(1, 2, 16, 16, 16)
    only_big[0, 0] = 20.0
    only_big[0, 0, 1:9, 1:9, 1:9], only_big[0, 1, 1:9, 1:9, 1:9] = -20.0, 20.0  # the small tumor missed
    # the small tumor's box: Dice (0 + 1) / (0 + 8 + 1); the big one's about 1: the mean is about half
    assert per_tumor_dice_loss(only_big, seg, boxes).item() == pytest.approx((1 - 1 / 9) / 2, abs=1e-4)
    assert soft_dice_loss(only_big, seg).item() < 0.02  # the batch Dice barely sees the miss
    flipped = torch.zeros(1, 2, 16, 16, 16)
    flipped[0, 0] = 20.0
    flipped[0, 0, 12:14, 12:14, 12:14], flipped[0, 1, 12:14, 12:14, 12:14] = -20.0, 20.0  # the big one missed
    assert per_tumor_dice_loss(flipped, seg, boxes).item() == pytest.approx((1 - 1 / 513) / 2, abs=1e-4)
    # a box clipped to the patch, one outside it (skipped); no tumor at all: 0 with a gradient path
    clipped = torch.tensor([[0, -4, 1, 1, 9, 9, 9], [0, 20, 20, 20, 24, 24, 24]])
    assert per_tumor_dice_loss(only_big, seg, clipped).item() == pytest.approx(0.0, abs=1e-4)
    logits = torch.zeros(1, 2, 16, 16, 16, requires_grad=True)
    empty = per_tumor_dice_loss(logits, seg, torch.zeros(0, 7, dtype=torch.long))
    empty.backward()
    assert empty.item() == 0.0 and logits.grad is not None
    # in the multitask loss: weighed by loss.seg_dice_per_tumor, off by default, needs the boxes
    net = _net()
    x, seg2, boxes2, labels = _batch()
    out = net(x, boxes2)
    plain = multitask_loss(out, seg2, labels)
    weighed = multitask_loss(out, seg2, labels, LossWeights(seg_dice_per_tumor=0.5), boxes=boxes2)
    assert "seg_dice_per_tumor" not in plain
    assert torch.allclose(weighed["total"], plain["total"] + 0.5 * per_tumor_dice_loss(out["seg"], seg2, boxes2))
    with pytest.raises(ValueError, match="needs the tumors' boxes"):
        multitask_loss(out, seg2, labels, LossWeights(seg_dice_per_tumor=0.5))
    with pytest.raises(InputError, match=r"loss\.seg_dice_per_tumor: must be >= 0"):
        LossWeights(seg_dice_per_tumor=-1.0)


def test_supervised_contrastive_term_by_hand():
    z = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 3.0]])  # normalized inside: tumors 0 and 1 coincide
    y = {"tumor_type": torch.tensor([0, 0, 1])}
    # anchors 0 and 1: one positive each (the other), candidates the other two (cosine 1 and 0); tumor 2
    # has no positive and contributes nothing; temperature 1
    want = math.log(math.e + 1.0) - 1.0
    assert supervised_contrastive_loss(z, y, temperature=1.0).item() == pytest.approx(want, abs=1e-6)
    # averaged over tasks with an anchor; a task whose labels are all missing adds nothing
    y2 = {**y, "area": torch.tensor([MISSING, MISSING, MISSING]), "left_right": torch.tensor([0, 1, 0])}
    # left_right: anchor 0's positive is tumor 2 (cosine 0) against tumor 1 (cosine 1); anchor 2's is
    # tumor 0 (cosine 0) against tumor 1 (cosine 0); tumor 1 has no positive
    lr_term = (math.log(math.e + 1.0) + math.log(2.0)) / 2
    got = supervised_contrastive_loss(z, y2, temperature=1.0).item()
    assert got == pytest.approx((want + lr_term) / 2, abs=1e-6)
    # a missing label is neither anchor nor candidate
    y3 = {"tumor_type": torch.tensor([0, MISSING, 0])}
    assert supervised_contrastive_loss(z, y3, temperature=1.0).item() == pytest.approx(0.0, abs=1e-6)
    # separated classes cost less than mixed ones; no anchor at all: 0 with a gradient path
    tight = torch.tensor([[1.0, 0.0], [1.0, 0.05], [0.0, 1.0], [0.05, 1.0]])
    assert (supervised_contrastive_loss(tight, {"t": torch.tensor([0, 0, 1, 1])}).item() + 1.0
            < supervised_contrastive_loss(tight, {"t": torch.tensor([0, 1, 0, 1])}).item())
    e = torch.randn(3, 4, requires_grad=True)
    none = supervised_contrastive_loss(e, {"t": torch.tensor([0, 1, 2])})
    none.backward()
    assert none.item() == 0.0 and torch.equal(e.grad, torch.zeros_like(e))


def test_embedding_bank_gives_the_batch_positives_to_contrast():
    bank = EmbeddingBank(3)
    bank.push(torch.tensor([[3.0, 0.0], [0.0, 1.0]]), {"tumor_type": torch.tensor([0, 1])})
    assert len(bank) == 2 and torch.allclose(bank.emb[0], torch.tensor([1.0, 0.0]))  # stored normalized
    bank.push(torch.tensor([[0.0, 2.0], [1.0, 1.0]]),
              {"tumor_type": torch.tensor([1, 2]), "area": torch.tensor([4, 5])})
    assert len(bank) == 3  # first in, first out
    assert bank.labels["tumor_type"].tolist() == [1, 1, 2] and bank.labels["area"].tolist() == [MISSING, 4, 5]
    # a lone tumor has no positive in its batch; the bank's two tumors of its class give it one
    q = torch.tensor([[0.0, 1.0]], requires_grad=True)
    y = {"tumor_type": torch.tensor([1])}
    assert supervised_contrastive_loss(q, y).item() == 0.0
    loss = supervised_contrastive_loss(q, y, bank, temperature=1.0)
    s2 = 1.0 / math.sqrt(2.0)  # cosine with the bank's third tumor (1, 1)
    want = -(1.0 - math.log(2 * math.e + math.e ** s2))  # both positives at cosine 1
    assert loss.item() == pytest.approx(want, abs=1e-6)
    loss.backward()
    assert q.grad.abs().sum() > 0 and not bank.emb.requires_grad  # the bank is a constant
    none = EmbeddingBank(0)  # loss.metric_memory: 0: the batch alone
    none.push(torch.tensor([[0.0, 2.0]]), {"tumor_type": torch.tensor([1])})
    assert len(none) == 0 and supervised_contrastive_loss(q, y, none).item() == 0.0


def test_metric_term_in_the_multitask_loss():
    net = _net()
    x, seg, boxes, labels = _batch()
    out = net(x, boxes)
    plain = multitask_loss(out, seg, labels)
    bank = EmbeddingBank(8)
    bank.push(torch.randn(4, 8), {"tumor_type": torch.tensor([0, 2, 0, 1]), "left_right": torch.tensor([0, 1, 1, 0])})
    w = LossWeights(metric=0.3, metric_temperature=0.2)
    got = multitask_loss(out, seg, labels, w, bank)
    assert "metric" not in plain
    assert torch.allclose(got["metric"], supervised_contrastive_loss(out["embedding"], labels, bank, 0.2))
    assert got["metric"].item() > 0
    assert torch.allclose(got["total"], plain["total"] + 0.3 * got["metric"])
    for bad, msg in (({"metric": -0.1}, r"loss\.metric: must be >= 0"),
                     ({"metric_temperature": 0.0}, r"loss\.metric_temperature: must be > 0"),
                     ({"metric_memory": -1}, r"loss\.metric_memory: must be >= 0"),
                     ({"metric_memory": 2.5}, r"loss\.metric_memory: must be a whole number")):
        with pytest.raises(InputError, match=msg):
            LossWeights(**bad)


def test_tumor_voxels_weigh_more_in_the_segmentation_term():
    net = _net()
    x, seg, boxes, labels = _batch()
    out = net(x, boxes)
    per_voxel = F.cross_entropy(out["seg"], seg, reduction="none")
    w = torch.where(seg > 0, 3.0, 1.0)
    t = multitask_loss(out, seg, labels, LossWeights(seg_tumor_weight=3.0))
    assert torch.allclose(t["seg"], (w * per_voxel).sum() / w.sum())  # the voxels' mean, weighed
    plain = multitask_loss(out, seg, labels, LossWeights())["seg"]
    assert torch.allclose(plain, per_voxel.mean())  # 1: the paper's plain mean
    # the net starts at "tumor unlikely" (seg_prior): tumor voxels cost more than the rest, so weighing them
    # up raises the term
    assert t["seg"] > plain
    for bad in (0.0, -1.0):
        with pytest.raises(InputError, match=r"loss\.seg_tumor_weight: must be > 0"):
            LossWeights(seg_tumor_weight=bad)


def test_an_unknown_optimizer_is_refused():
    with pytest.raises(InputError, match=r"train\.optimizer: expected one of sgd, adamw, got 'adam'"):
        TrainConfig(optimizer="adam")
