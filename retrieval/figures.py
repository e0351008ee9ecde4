"""The report's figures (matplotlib, Agg backend: headless), each returned as a PNG data URI.

- K curve (paper Fig. 4): accuracy per task and size RMSE against K, learned vs handcrafted;
- t-SNE of the held-out embeddings (Fig. 5): colour = tumor size, marker = tumor type;
- retrieval examples (Fig. 6): a query tumor and its nearest tumors from other patients, three
  orthogonal slices through each tumor's centre with the mask outline, labels and distance under each;
- training curves from the run's metrics.jsonl.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

MARKERS = ("o", "s", "^", "D", "v", "P", "X")


def to_data_uri(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def k_curve_figure(res: dict) -> str:
    """res: an evaluation record (retrieval.evaluate.evaluate)."""
    curves = res["k_curve"]
    ks = sorted(int(q) for q in curves["learned"])
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.2))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, t in enumerate(res["tasks"]):
        c = colours[i % len(colours)]
        for row, style in (("learned", "-"), ("handcrafted", "--")):
            ax.plot(ks, [_num(curves[row][str(q)][f"acc_{t}"]) for q in ks], style, color=c,
                    label=f"{t} ({row})", marker="o" if row == "learned" else None, ms=3)
    ax.set(xlabel="K (neighbours)", ylabel="KNN accuracy", title="Accuracy per task against K", ylim=(0, 1.02))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    for row, style in (("learned", "-o"), ("handcrafted", "--")):
        ax2.plot(ks, [_num(curves[row][str(q)]["rmse_size_mm"]) for q in ks], style, label=row, ms=3)
    ax2.axhline(_num(res["rows"]["no_embedding"]["rmse_size_mm"]), color="grey", ls=":", label="mean size")
    ax2.set(xlabel="K (neighbours)", ylabel="RMSE (mm)", title="Tumor size RMSE against K")
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=8)
    return to_data_uri(fig)


def _num(v) -> float:
    return float("nan") if v is None else float(v)


def tsne_figure(x: np.ndarray, size_mm: np.ndarray, types: np.ndarray, type_names: Sequence[str], *,
                seed: int = 0) -> str:
    """t-SNE (2D) of embeddings x (n, C), coloured by size, a marker per type (-1: unknown)."""
    from sklearn.manifold import TSNE

    n = len(x)
    fig, ax = plt.subplots(figsize=(7, 6))
    if n >= 5:
        xy = TSNE(n_components=2, perplexity=float(min(30, max(2, (n - 1) // 3))), init="pca",
                  random_state=seed).fit_transform(x.astype(np.float64))
        vmin, vmax = float(size_mm.min()), float(size_mm.max())
        names = [*type_names, "unknown"]
        for j, name in enumerate(names):
            m = types == (j if j < len(type_names) else -1)
            if m.any():
                sc = ax.scatter(xy[m, 0], xy[m, 1], c=size_mm[m], cmap="viridis", vmin=vmin, vmax=vmax,
                                marker=MARKERS[j % len(MARKERS)], s=36, edgecolors="k", linewidths=0.3, label=name)
        fig.colorbar(sc, ax=ax, label="tumor size (mm)")
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, f"{n} held-out tumors: too few for t-SNE", ha="center", va="center")
    ax.set(title=f"t-SNE of {n} held-out tumor embeddings", xticks=[], yticks=[])
    return to_data_uri(fig)


def tumor_views(image: np.ndarray, instances: np.ndarray, tumor_id: int, bbox, window: int = 48):
    """Three orthogonal slices (axial, coronal, sagittal) through the tumor's box centre, cropped to
    a window around it -> [(image slice, mask slice)] in display orientation (RAS arrays)."""
    c = [(int(lo) + int(hi) - 1) // 2 for lo, hi in zip(bbox[:3], bbox[3:], strict=True)]
    half = window // 2
    sl = [slice(max(ci - half, 0), ci + half) for ci in c]
    mask = instances == tumor_id
    views = []
    for axis in (2, 1, 0):  # axial (z), coronal (y), sagittal (x)
        index = [sl[0], sl[1], sl[2]]
        index[axis] = c[axis]
        views.append((image[tuple(index)].T, mask[tuple(index)].T))
    return views


def retrieval_figure(panels: Sequence[dict]) -> str:
    """panels: the query then its hits, each {"title", "caption", "views": tumor_views(...)}."""
    n = len(panels)
    fig, axes = plt.subplots(3, n, figsize=(2.3 * n, 7.2), squeeze=False)
    for j, p in enumerate(panels):
        for i, (img, mask) in enumerate(p["views"]):
            ax = axes[i, j]
            ax.imshow(img, cmap="gray", origin="lower", interpolation="nearest")
            if mask.any():
                ax.contour(mask.astype(float), levels=[0.5], colors="#ff3b30", linewidths=0.8)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[0, j].set_title(p["title"], fontsize=9)
        axes[2, j].set_xlabel(p["caption"], fontsize=7)
    for i, name in enumerate(("axial", "coronal", "sagittal")):
        axes[i, 0].set_ylabel(name, fontsize=8)
    fig.tight_layout()
    return to_data_uri(fig)


def training_figure(records: Sequence[dict]) -> str:
    """Training curves from metrics.jsonl records (one per epoch)."""
    steps = [r["step"] for r in records]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4))
    for key, style in (("train/loss", "-o"), ("train/loss_seg", "-"), ("val/loss", "--o")):
        if any(key in r for r in records):
            ax.plot(steps, [r.get(key, np.nan) for r in records], style, label=key, ms=3)
    ax.set(xlabel="step", ylabel="loss", title="Losses", yscale="log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    for key in sorted({k for r in records for k in r if k.startswith("val/acc_")} | {"val/dice"}):
        ax2.plot(steps, [r.get(key, np.nan) for r in records], "-o", label=key.removeprefix("val/"), ms=3)
    ax2.set(xlabel="step", ylabel="held-out score", title="Held-out Dice and accuracy per task", ylim=(0, 1.02))
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=8)
    return to_data_uri(fig)
