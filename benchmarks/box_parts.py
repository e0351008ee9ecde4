"""Which part of a box query moves its top-1 away from the mask query's: on the model's validation
(or test) tumors, a box drawn `--grow` too large (as benchmarks/box_query.py draws it, read as a search
by box reads it: retrieval.search.drawn_box_parts) against the training tumors' vectors; the share
whose top-1 is the mask query's top-1 as drawn, with one part at a time taken from the mask query
instead (an oracle: which part a better estimate would have to fix), and with the box's size part
off from the tumor's own box by a given log volume (how far off a size estimate may be).

    .venv/bin/python benchmarks/box_parts.py --model M --embeddings E --manifest X --secret-file K [--grow 0.2]
        [--on validation]

The database is the model's training split (other patients than every query); the query's parts
are composed with the model file's recipe and statistics.
"""

from __future__ import annotations

import argparse

import numpy as np

from embedder.embed import embed_settings
from retrieval.evaluate import load_evaluation, shard_parts
from retrieval.search import drawn_box_parts
from tumornet.boxes import grown_box_mm
from tumornet.descriptor import compose, stack_parts
from tumornet.drawn import drawn_fit_of
from tumornet.export import load_model
from tumornet.keys import keyed_id, read_secret
from tumornet.manifest import read_manifest
from tumornet.volumes import load_volume


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for a in ("--model", "--embeddings", "--manifest", "--secret-file"):
        p.add_argument(a, required=True)
    p.add_argument("--grow", type=float, default=0.2)
    p.add_argument("--on", default="validation", choices=["test", "validation"])
    args = p.parse_args()
    secret = read_secret(args.secret_file)
    model, meta = load_model(args.model)
    spacing, patch, (cfg, stats) = embed_settings(meta, args.model)
    fit = drawn_fit_of(cfg, stats, args.model)  # the recipe's drawn-box size regression, where it reads one
    ev = load_evaluation(args.embeddings, args.manifest, secret, args.model, on=args.on)
    parts = shard_parts(ev.table)
    images = {keyed_id(s, secret): rows[0].image for s, rows in read_manifest(args.manifest).scans().items()}
    rows = ev.test_rows
    box_parts, last = [], (None, None)
    for i in rows:
        key = ev.table["scan_key"][int(i)].as_py()
        if last[0] != key:
            last = (key, load_volume(images[key], scan_id="query", spacing_mm=spacing))
        box = grown_box_mm(ev.table["bbox_mm"][int(i)].as_py(), args.grow)
        box_parts.append(drawn_box_parts(model, last[1], box, cfg=cfg, patch_size=patch, where=images[key],
                                         drawn_fit=fit))
    drawn = stack_parts(box_parts)
    mask = {k: v[rows] for k, v in parts.items()}
    db = compose({k: v[ev.train_rows] for k, v in parts.items()}, cfg, model.schema, stats)

    def top1(q: dict) -> np.ndarray:
        x = compose(q, cfg, model.schema, stats)
        return ((x[:, None, :] - db[None]) ** 2).sum(-1).argmin(1)

    want = top1(mask)
    n = len(rows)
    print(f"box {100 * args.grow:.0f} % larger than the tumor, {n} {args.on} tumors, the training tumors as the "
          f"database: the same top-1 as the mask query {np.mean(top1(drawn) == want):.2f} as drawn")
    for key in (k for k in drawn if k in mask and k != "task_logits"):
        print(f"  {key} from the mask: {np.mean(top1(drawn | {key: mask[key]}) == want):.2f}")
    off = drawn["box_log_volume"].ravel() - mask["box_log_volume"]
    print(f"  the drawn box's log volume - the tumor box's: mean {off.mean():.2f}, sd {off.std():.2f}")
    for delta in (0.1, 0.2, 0.3, 0.55):
        q = drawn | {"box_log_volume": mask["box_log_volume"] + delta}
        print(f"  size part off by +{delta} (log volume): {np.mean(top1(q) == want):.2f}")


if __name__ == "__main__":
    main()
