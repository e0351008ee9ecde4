"""The paper's multitask network, in one pure-torch file (nanoGPT style).

    x (B, 1, D, H, W) [+ 3 coordinate channels from each patch's frame when `coords`]
      -> stem: two 3x3x3 conv + norm + ReLU at input resolution        (B, c_stem, D, H, W)
      -> MaxPool x4 (ceil mode: any size, odd too)                      (B, c_stem, D/4, H/4, W/4)
      -> ResBlocks (3x3x3, padding 1)                                   (B, c_deep, D/4, H/4, W/4)
      -> upsample x4 back to exactly (D, H, W), 1x1x1 to C, plus the stem's features (1x1x1 to C)
      -> norm + ReLU: the feature map                                   (B, C, D, H, W)
    heads:
      segmentation: one ResBlock over the feature map -> logits         (B, n_seg, D, H, W)
      RoiPool: slice the feature map to each tumor's box, global max   (N, C)   <- the embedding
      one Linear(C, n_classes) per task on the RoiPool vector          {task: (N, n_classes)}

Boxes are a (N, 7) tensor `(batch_index, lo0, lo1, lo2, hi0, hi1, hi2)` in voxels of the input,
half-open; parts outside the input are clipped. The stem skip is our choice (the paper's figure
shows the encoder-decoder only); `skip: false` in the config removes it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .errors import InputError
from .labels import LabelSchema


@dataclass(frozen=True, kw_only=True)
class NetConfig:
    channels: int = 64  # C: feature-map width = embedding size
    stem_channels: int | None = None  # default C / 2
    deep_channels: int | None = None  # default 2 C
    blocks: int = 3  # ResBlocks at 1/4 resolution
    norm: str = "batch"  # batch | instance | group
    seg_classes: int = 2  # background, tumor
    # initial tumor probability of every voxel (the segmentation logits' biases start at this prior):
    # tumors are 0.1-1 % of a patch, and from an even start short runs can settle on "no tumor
    # anywhere" and stay there (measured: 64^3 demo patches, Dice 0.00 after 280 steps; 0.61 after
    # 160 with the prior). 0 = PyTorch's default initialization.
    seg_prior: float = 0.01
    in_channels: int = 1
    # 3 more input channels: each voxel's place in the head (RAS, the head's foreground box spanning
    # [-1, 1]; patches.patch_frame), so features and RoiPool can carry where a tumor is
    coords: bool = False
    skip: bool = True
    channels_last: bool = True  # channels_last_3d memory format: 1.5-2x faster convolutions on CPU

    def __post_init__(self) -> None:
        if self.channels < 1 or self.blocks < 1:
            raise InputError(f"model: channels and blocks must be >= 1, got {self.channels}, {self.blocks}")
        if self.norm not in ("batch", "instance", "group"):
            raise InputError(f"model.norm: expected batch, instance or group, got {self.norm!r}")
        if not 0 <= self.seg_prior < 1:
            raise InputError(f"model.seg_prior: expected a probability in [0, 1), got {self.seg_prior}")

    @property
    def c_stem(self) -> int:
        return self.stem_channels or max(self.channels // 2, 8)

    @property
    def c_deep(self) -> int:
        return self.deep_channels or 2 * self.channels


def _norm(kind: str, c: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm3d(c)
    if kind == "instance":
        return nn.InstanceNorm3d(c, affine=True)
    return nn.GroupNorm(min(8, c), c)


def conv_norm_relu(c_in: int, c_out: int, norm: str) -> nn.Sequential:
    return nn.Sequential(nn.Conv3d(c_in, c_out, 3, padding=1, bias=False), _norm(norm, c_out), nn.ReLU(inplace=True))


class ResBlock(nn.Module):
    """Paper Fig. 2: conv-norm-ReLU, conv-norm, plus identity (or 1x1x1 projection), ReLU.

    As a head (`head=True`) it outputs logits: the second conv and the projection have a bias
    and no normalization, and there is no final ReLU.
    """

    def __init__(self, c_in: int, c_out: int, norm: str = "batch", *, head: bool = False):
        super().__init__()
        self.conv1 = conv_norm_relu(c_in, c_out, norm)
        conv2 = nn.Conv3d(c_out, c_out, 3, padding=1, bias=head)
        self.conv2 = conv2 if head else nn.Sequential(conv2, _norm(norm, c_out))
        if c_in == c_out:
            self.skip = nn.Identity()
        else:
            proj = nn.Conv3d(c_in, c_out, 1, bias=head)
            self.skip = proj if head else nn.Sequential(proj, _norm(norm, c_out))
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv2(self.conv1(x)) + self.skip(x)
        return y if self.head else F.relu(y, inplace=True)


class Backbone(nn.Module):
    def __init__(self, cfg: NetConfig):
        super().__init__()
        self.stem = nn.Sequential(conv_norm_relu(cfg.in_channels + 3 * cfg.coords, cfg.c_stem, cfg.norm),
                                  conv_norm_relu(cfg.c_stem, cfg.c_stem, cfg.norm))
        blocks = [ResBlock(cfg.c_stem, cfg.c_deep, cfg.norm)]
        blocks += [ResBlock(cfg.c_deep, cfg.c_deep, cfg.norm) for _ in range(cfg.blocks - 1)]
        self.body = nn.Sequential(*blocks)
        self.up_proj = nn.Conv3d(cfg.c_deep, cfg.channels, 1, bias=False)
        self.skip_proj = nn.Conv3d(cfg.c_stem, cfg.channels, 1, bias=False) if cfg.skip else None
        self.out_norm = _norm(cfg.norm, cfg.channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[2:]
        s = self.stem(x)  # (B, c_stem, D, H, W)
        d = self.body(F.max_pool3d(s, 4, ceil_mode=True))  # (B, c_deep, ~D/4, ~H/4, ~W/4)
        # 1x1x1 commutes with trilinear upsampling: project first, upsample fewer channels
        y = F.interpolate(self.up_proj(d), size=size, mode="trilinear", align_corners=False)
        if self.skip_proj is not None:
            y = y + self.skip_proj(s)
        return F.relu(self.out_norm(y), inplace=True)  # (B, C, D, H, W)


def _clipped_boxes(boxes: torch.Tensor, size) -> list[tuple[int, list[int], list[int]]]:
    if boxes.ndim != 2 or boxes.shape[1] != 7:
        raise ValueError(f"boxes must be (N, 7) (batch_index, lo0, lo1, lo2, hi0, hi1, hi2), got {tuple(boxes.shape)}")
    out = []
    for row in boxes.tolist():
        lo = [max(int(v), 0) for v in row[1:4]]
        hi = [min(int(v), s) for v, s in zip(row[4:7], size, strict=True)]
        if any(h <= l for l, h in zip(lo, hi, strict=True)):
            raise ValueError(f"box {row[1:]} lies outside the feature map of size {tuple(size)}")
        out.append((int(row[0]), lo, hi))
    return out


class _RoiMaxPool(torch.autograd.Function):
    """Max over each box; backward scatters into one gradient buffer (not one per box)."""

    @staticmethod
    def forward(ctx, features: torch.Tensor, boxes: torch.Tensor):
        C = features.shape[1]
        values, where = [], []
        for b, lo, hi in _clipped_boxes(boxes, features.shape[2:]):
            region = features[b, :, lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
            v, idx = region.reshape(C, -1).max(dim=1)
            shape = [h - l for l, h in zip(lo, hi, strict=True)]
            i, j, k = idx // (shape[1] * shape[2]) + lo[0], idx // shape[2] % shape[1] + lo[1], idx % shape[2] + lo[2]
            values.append(v)
            where.append(torch.stack([torch.full_like(idx, b), torch.arange(C, device=idx.device), i, j, k]))
        ctx.feature_shape, ctx.memory_format = features.shape, _memory_format(features)
        ctx.save_for_backward(torch.cat(where, dim=1) if where else torch.zeros((5, 0), dtype=torch.long))
        return torch.stack(values) if values else features.new_zeros((0, C))

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (where,) = ctx.saved_tensors
        grad = torch.empty(ctx.feature_shape, dtype=grad_out.dtype, device=grad_out.device,
                           memory_format=ctx.memory_format).zero_()
        grad.index_put_(tuple(where), grad_out.reshape(-1), accumulate=True)
        return grad, None


def _memory_format(t: torch.Tensor) -> torch.memory_format:
    return torch.channels_last_3d if t.is_contiguous(memory_format=torch.channels_last_3d) and not t.is_contiguous() \
        else torch.contiguous_format


def roi_pool(features: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Global max over each box -> (N, C). boxes: (N, 7) (batch_index, lo xyz, hi xyz), clipped.

    features (B, C, D, H, W); a box partly outside is clipped, one wholly outside raises.
    """
    return _RoiMaxPool.apply(features, boxes)


def roi_mean_pool(features: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Mean over each box -> (N, C) (boxes as roi_pool, clipped)."""
    C = features.shape[1]
    out = [features[b, :, lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]].reshape(C, -1).mean(1)
           for b, lo, hi in _clipped_boxes(boxes, features.shape[2:])]
    return torch.stack(out) if out else features.new_zeros((0, C))


def grown_boxes(boxes: torch.Tensor, margin: float = 0.5, at_least: int = 2) -> torch.Tensor:
    """Boxes (N, 7) grown on every side by `margin` x their size per axis (at least `at_least`
    voxels); roi pooling clips them to the feature map."""
    lo, hi = boxes[:, 1:4], boxes[:, 4:7]
    pad = torch.clamp(torch.ceil((hi - lo).double() * margin).long(), min=at_least)
    return torch.cat([boxes[:, :1], lo - pad, hi + pad], dim=1)


def shell_mean_pool(features: torch.Tensor, boxes: torch.Tensor, margin: float = 0.5) -> torch.Tensor:
    """Mean over the shell around each box (the box grown by `margin` x its size per side, minus the
    box): the tissue around a tumor -> (N, C). A shell wholly outside the feature map gives zeros."""
    C = features.shape[1]
    size = features.shape[2:]
    out = []
    for (b, lo, hi), (_, glo, ghi) in zip(_clipped_boxes(boxes, size), _clipped_boxes(grown_boxes(boxes, margin), size),
                                          strict=True):
        grown = features[b, :, glo[0]:ghi[0], glo[1]:ghi[1], glo[2]:ghi[2]].reshape(C, -1)
        inner = features[b, :, lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]].reshape(C, -1)
        n = grown.shape[1] - inner.shape[1]
        out.append((grown.sum(1) - inner.sum(1)) / n if n > 0 else features.new_zeros(C))
    return torch.stack(out) if out else features.new_zeros((0, C))


def coordinate_channels(frame: torch.Tensor, size) -> torch.Tensor:
    """Frames (B, 6) (start xyz, step xyz: patches.patch_frame) -> (B, 3, D, H, W): each voxel's
    place in the head, per axis."""
    b = frame.shape[0]
    axes = []
    for a, n in enumerate(size):
        v = frame[:, a, None] + frame[:, 3 + a, None] * torch.arange(n, device=frame.device, dtype=frame.dtype)
        shape = [b, 1, 1, 1]
        shape[1 + a] = n
        axes.append(v.reshape(shape).expand(b, *size))
    return torch.stack(axes, dim=1)


@torch.no_grad()
def init_prior(head: ResBlock, prior: float) -> None:
    """Start a head's softmax at P(background) = 1 - prior, the rest shared by the tumor classes
    (the prior-probability initialization of Lin et al., "Focal Loss for Dense Object Detection")."""
    n = head.conv2.bias.numel()
    head.conv2.bias.zero_()
    head.conv2.bias[1:] = math.log(prior / (n - 1)) - math.log(1 - prior)
    if isinstance(head.skip, nn.Conv3d) and head.skip.bias is not None:
        head.skip.bias.zero_()


class MultitaskNet(nn.Module):
    def __init__(self, cfg: NetConfig, schema: LabelSchema):
        super().__init__()
        self.cfg = cfg
        self.schema = schema
        self.backbone = Backbone(cfg)
        self.seg_head = ResBlock(cfg.channels, cfg.seg_classes, cfg.norm, head=True)
        self.task_heads = nn.ModuleDict({t.name: nn.Linear(cfg.channels, t.n_classes) for t in schema.tasks})
        if cfg.seg_prior > 0:
            init_prior(self.seg_head, cfg.seg_prior)
        self.memory_format = torch.channels_last_3d if cfg.channels_last else torch.contiguous_format
        self.to(memory_format=self.memory_format)  # weights too: contiguous weights cost 1.4x a step

    def features(self, x: torch.Tensor, frame: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, 1, D, H, W) [, frames (B, 6)] -> the feature map (B, C, D, H, W)."""
        if self.cfg.coords:
            if frame is None:
                raise ValueError("this network reads coordinate channels (model.coords): pass each patch's frame")
            x = torch.cat([x, coordinate_channels(frame.to(device=x.device, dtype=x.dtype), x.shape[2:])], dim=1)
        return self.backbone(x.contiguous(memory_format=self.memory_format))

    def forward(self, x: torch.Tensor, boxes: torch.Tensor, frame: torch.Tensor | None = None) -> dict:
        """x (B, 1, D, H, W), boxes (N, 7), frame (B, 6) (needed with `coords`) -> {"seg": (B, n_seg,
        D, H, W), "embedding": (N, C), "tasks": {task: (N, n_classes)}}."""
        f = self.features(x, frame)
        emb = roi_pool(f, boxes)
        return {"seg": self.seg_head(f), "embedding": emb,
                "tasks": {name: head(emb) for name, head in self.task_heads.items()}}

    @torch.no_grad()
    def embed(self, volume: torch.Tensor, boxes, frame=None) -> torch.Tensor:
        """Retrieval embeddings: one volume or patch (D, H, W) / (1, D, H, W), boxes (n, 6) [, its
        frame (6,)] -> (n, C)."""
        x = torch.as_tensor(volume, dtype=torch.float32)
        while x.ndim < 5:
            x = x.unsqueeze(0)
        b = torch.as_tensor(boxes, dtype=torch.long).reshape(-1, 6)
        b = torch.cat([torch.zeros((len(b), 1), dtype=torch.long), b], dim=1)
        f = None if frame is None else torch.as_tensor(np.asarray(frame, dtype=np.float32)).reshape(1, 6)
        was_training = self.training
        self.eval()
        try:
            return roi_pool(self.features(x.to(self.device), f), b)
        finally:
            self.train(was_training)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device
