"""What tumor count and size a box query should read (retrieval.scan_count, nineteenth round;
retrieval.drawn_size, twentieth round): on the model's
validation (or test) tumors, boxes drawn exactly, `--grow` too large and `--draws` times as the paper's
eq. 2 draws them (in mm), each read as `search --box` reads it (retrieval.search.drawn_box_parts), with
the scan's tumor count
- unknown (what a box query without --scan-tumors reads: the heads fit without the count),
- given (the mask's count, as `search --scan-tumors` gives it),
- as the segmentation head counts it (the drawn tumor plus every component found at `--detect
  THRESHOLD:MIN_ML` whose box does not overlap the drawn one; what a box query read before),
scored against the training tumors: the rule (retrieval.experiments.recipe_score of the KNN@5 scores),
type accuracy, and the share whose top-1 is the mask query's; and how often the segmentation head's
count is the scan's. Each `--drawn-size W` (default: the model's recipe) scores every count again with
the drawn boxes' size read at that weight toward the tumor's span in them (tumornet.drawn.drawn_extent),
or toward the extent the model's regression reads (retrieval.drawn_read: fit, tumornet.drawn.fitted_extent).
`--decompose` also says which part moves a rough box's top-1 away from the mask query's (twenty-third
round): for each box kind and each part, the share kept when the rough box's query takes that one part
from the exactly drawn box's (count unknown).

    .venv/bin/python benchmarks/box_count.py --model M --embeddings E --manifest X --secret-file K
        [--on validation] [--grow 0.2] [--draws 2] [--detect 0.5:0.05 --detect 0.9:1] [--drawn-size 0 --drawn-size 0.33]
        [--decompose]

The model file must carry the heads fit without the count (exported or retuned since the nineteenth
round; `retune --manifest` with the same recipe adds them); the shards may be its base model's: the
database's and the mask queries' vectors are composed from their stored parts with the model's recipe.
"""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np

from embedder.embed import embed_settings
from retrieval.evaluate import load_evaluation, shard_parts
from retrieval.experiments import recipe_score
from retrieval.knn import knn_scores
from retrieval.search import drawn_box_parts
from tumornet.boxes import box_mm_to_voxels, grown_box_mm, overlaps
from tumornet.descriptor import compose, stack_parts
from tumornet.detect import DetectConfig, tumor_probability, tumors_from_probability
from tumornet.drawn import drawn_fit_of, with_drawn_size
from tumornet.errors import InputError
from tumornet.export import load_model
from tumornet.fitted import require_uncounted
from tumornet.keys import keyed_id, read_secret
from tumornet.manifest import read_manifest
from tumornet.recipe import RetrievalConfig
from tumornet.register import register
from tumornet.volumes import load_volume


def distorted_mm(box_mm, rng: np.random.Generator, *, log2_scale_sd: float = 1 / 3, shift_sd: float = 0.1):
    """The paper's eq. 2 on a millimetre box (tumornet.boxes.distort_box without rounding to voxels)."""
    lo, hi = np.asarray(box_mm[:3], float), np.asarray(box_mm[3:], float)
    size, centre = hi - lo, (lo + hi) / 2
    new_size = size * np.exp2(rng.normal(0.0, log2_scale_sd, 3))
    new_centre = centre + size * rng.normal(0.0, shift_sd, 3)
    return np.concatenate([new_centre - new_size / 2, new_centre + new_size / 2])


def _detect_setting(text: str) -> tuple[float, float]:
    """--detect THRESHOLD:MIN_ML -> (threshold, minimum volume in ml), validated as DetectConfig does."""
    try:
        threshold, min_ml = (float(v) for v in text.split(":"))
        DetectConfig(threshold=threshold, min_volume_ml=min_ml)
    except (ValueError, InputError) as e:
        raise argparse.ArgumentTypeError(f"expected THRESHOLD:MIN_ML, e.g. 0.5:0.05, got {text!r} ({e})") from None
    return threshold, min_ml


def _weight(text: str) -> float:
    """--drawn-size W -> a weight from 0 to 1, validated as retrieval.drawn_size is."""
    try:
        return RetrievalConfig(drawn_size=float(text)).drawn_size
    except (ValueError, InputError) as e:
        raise argparse.ArgumentTypeError(f"expected a weight from 0 to 1, got {text!r} ({e})") from None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for a in ("--model", "--embeddings", "--manifest", "--secret-file"):
        p.add_argument(a, required=True)
    p.add_argument("--on", default="validation", choices=["test", "validation"])
    p.add_argument("--grow", type=float, default=0.2)
    p.add_argument("--draws", type=int, default=2)
    p.add_argument("--seed", type=int, default=19)
    p.add_argument("--detect", action="append", default=None, metavar="THRESHOLD:MIN_ML", type=_detect_setting,
                   help="segmentation-head count settings to compare (default 0.5:0.05, the detection default)")
    p.add_argument("--drawn-size", action="append", type=_weight, default=None, metavar="W",
                   help="drawn boxes' size weights to compare (retrieval.drawn_size; default: the model's)")
    p.add_argument("--decompose", action="store_true",
                   help="per rough box kind, the top-1 kept with each part taken from the exact box's")
    args = p.parse_args()
    detects = args.detect or [(0.5, 0.05)]
    secret = read_secret(args.secret_file)
    model, meta = load_model(args.model)
    spacing, patch, (cfg, stats) = embed_settings(meta, args.model)
    sizes = args.drawn_size or [cfg.drawn_size]
    raw = dataclasses.replace(cfg, drawn_size=0.0)  # the drawn boxes' own size, blended below per weight
    try:  # the recipe's read of a drawn box's size (retrieval.drawn_read), at every weight
        fit = drawn_fit_of(dataclasses.replace(cfg, drawn_size=1.0), stats, args.model)
    except InputError as e:
        raise SystemExit(str(e)) from None
    if not cfg.scan_count:
        raise SystemExit(f"{args.model}: the recipe does not read the scan's tumor count (retrieval.scan_count)")
    try:
        require_uncounted(stats, args.model)
    except InputError as e:
        raise SystemExit(str(e)) from None
    ev = load_evaluation(args.embeddings, args.manifest, secret, args.model, on=args.on)
    parts = shard_parts(ev.table)
    images = {keyed_id(s, secret): rows[0].image for s, rows in read_manifest(args.manifest).scans().items()}
    rng = np.random.default_rng(args.seed)
    kinds = ["exact", f"{100 * args.grow:.0f} % too large", *(f"eq. 2 draw {d + 1}" for d in range(args.draws))]
    drawn: dict[str, list[dict]] = {k: [] for k in kinds}
    counts: dict[str, list[list[int]]] = {k: [] for k in kinds}
    scan = (None,)
    for i in ev.test_rows:
        key = ev.table["scan_key"][int(i)].as_py()
        if scan[0] != key:  # the scan's registration and tumor probability, once per scan
            vol = load_volume(images[key], scan_id="query", spacing_mm=spacing)
            frame = register(vol.array, vol.affine, warp_mm=cfg.warp_mm) if cfg.needs_frame else None
            prob = tumor_probability(model, vol.array)
            found = [tumors_from_probability(prob, vol, DetectConfig(threshold=t, min_volume_ml=v))[1]
                     for t, v in detects]
            scan = (key, vol, frame, found)
        _, vol, frame, found = scan
        box = np.asarray(ev.table["bbox_mm"][int(i)].as_py(), float)
        boxes = [box, grown_box_mm(box, args.grow), *(distorted_mm(box, rng) for _ in range(args.draws))]
        for kind, b in zip(kinds, boxes, strict=True):
            drawn[kind].append((drawn_box_parts(model, vol, b, cfg=raw, patch_size=patch, where=images[key],
                                                frame=frame), vol.spacing_mm))
            vbox = box_mm_to_voxels(b, vol.affine, vol.array.shape)
            counts[kind].append([1 + sum(not overlaps(t.bbox, vbox) for t in f) for f in found])
    db = compose({k: v[ev.train_rows] for k, v in parts.items()}, cfg, model.schema, stats)
    train = ev.train.with_x(db)

    def top1(x: np.ndarray) -> np.ndarray:
        return ((x[:, None, :] - db[None]) ** 2).sum(-1).argmin(1)

    want = top1(compose({k: v[ev.test_rows] for k, v in parts.items()}, cfg, model.schema, stats))
    true = np.rint(np.exp(parts["scan_log_tumors"][ev.test_rows]))  # the mask's count, a whole number
    variants = ["unknown (heads without the count)", "given (the mask's)",
                *(f"segmentation head at {t:g}, >= {v:g} ml" for t, v in detects)]
    print(f"{len(want)} {args.on} tumors, the training tumors as the database, K = 5; per variant: rule, type "
          "accuracy, the mask query's top-1 kept, for boxes " + ", ".join(kinds))
    for w in sizes:
        toward = "the tumor's span" if fit is None else "the regression's extent (drawn_read: fit)"
        print(f"drawn boxes' size at weight {w:g} toward {toward} (retrieval.drawn_size):")
        queries = {kind: stack_parts([with_drawn_size(d, w, at, fit) for d, at in drawn[kind]]) for kind in kinds}
        for n, name in enumerate(variants):
            cells, rules, kept = [], [], []
            for kind in kinds:
                q = dict(queries[kind])  # the count unknown; given or counted below
                if n == 1:
                    q["scan_log_tumors"] = np.log(true)
                elif n > 1:
                    q["scan_log_tumors"] = np.log(np.asarray(counts[kind], float)[:, n - 2])
                x = compose(q, cfg, model.schema, stats)
                sc = knn_scores(train, ev.test.with_x(x), [5], ev.tasks)[5]
                rules.append(recipe_score(sc))
                kept.append(np.mean(top1(x) == want))
                cells.append(f"{rules[-1]:.3f} {sc['acc_tumor_type']:.2f} {kept[-1]:.2f}")
            hit = np.mean(np.asarray(counts["exact"])[:, n - 2] == true) if n >= 2 else 0.0
            right = "" if n < 2 else f"; the count right for {hit:.2f} of the exact boxes"
            print(f"  {name}: " + " | ".join(cells) + f"; mean rule {np.mean(rules):.3f}, top-1 kept "
                  f"{np.mean(kept):.3f}{right}")
        if args.decompose:
            _decompose(queries, lambda q: np.mean(top1(compose(q, cfg, model.schema, stats)) == want))


# what a drawn box's size is read from, not parts that compose reads
SIZE_READS = ("extent", "tumor_span", "span_profile")


def _decompose(queries: dict[str, dict[str, np.ndarray]], kept) -> None:
    """Which part moves a rough box's top-1 (--decompose): per box kind after the first (exact), the share
    of mask-query top-1s kept as drawn and with each part taken from the exact box's (count unknown)."""
    exact = queries[next(iter(queries))]
    names = [k for k in exact if k not in SIZE_READS]
    print("  top-1 kept with one part from the exact box (count unknown): " + ", ".join(names))
    for kind, q in list(queries.items())[1:]:
        cells = [f"{k} {kept({**q, k: exact[k]}):.2f}" for k in names]
        print(f"    {kind}: as drawn {kept(q):.2f} | " + " | ".join(cells))

if __name__ == "__main__":
    main()
