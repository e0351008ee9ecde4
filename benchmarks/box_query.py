"""Query by box vs query by mask on the held-out split: the share of held-out tumors whose top-1
archive hit is the same when the query is a box drawn `--grow` too large (each side grown by that
share of the tumor's extent, about the tumor's centre) as when it is the tumor's mask.

    .venv/bin/python benchmarks/box_query.py --model M --embeddings E --manifest X --secret-file K [--grow 0.2]
        [--on validation] [--rerank M]

`--on validation`: the model's validation patients (to compare searches without the test);
`--rerank M`: search with that many first-stage candidates instead of the model's recipe (0: one stage).
"""

from __future__ import annotations

import argparse

import numpy as np

from retrieval.search import search, search_box
from tumornet.export import load_model
from tumornet.keys import read_secret
from tumornet.manifest import read_manifest
from tumornet.scans import load_scan
from tumornet.split import split_of_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for a in ("--model", "--embeddings", "--manifest", "--secret-file"):
        p.add_argument(a, required=True)
    p.add_argument("--grow", type=float, default=0.2)
    p.add_argument("--on", default="test", choices=["test", "validation"])
    p.add_argument("--rerank", type=int)
    args = p.parse_args()
    read_secret(args.secret_file)
    _, meta = load_model(args.model)
    cohort = read_manifest(args.manifest)
    _, held_out = split_of_model(cohort, meta, where=args.model, on=args.on)
    scans = cohort.scans()
    same = total = 0
    for s in held_out:
        rows = list(scans[s])
        by_mask = search(args.model, args.embeddings, rows, k=1, rerank=args.rerank)
        tumors = {t.tumor_id: t for t in load_scan(rows, spacing_mm=meta["extra"]["spacing_mm"]).tumors}
        for q, r in zip(by_mask, rows, strict=True):
            box = np.asarray(tumors[r.tumor_id].bbox_mm, dtype=float)
            centre, half = (box[:3] + box[3:]) / 2, (box[3:] - box[:3]) / 2 * (1 + args.grow)
            (b,) = search_box(args.model, args.embeddings, r.image, [*(centre - half), *(centre + half)], k=1,
                              rerank=args.rerank)
            top_mask, top_box = q["hits"][0], b["hits"][0]
            same += (top_mask["scan_key"], top_mask["tumor_id"]) == (top_box["scan_key"], top_box["tumor_id"])
            total += 1
    print(f"box {100 * args.grow:.0f} % larger than the tumor: the same top-1 as the mask query for {same} of "
          f"{total} {args.on} tumors ({100 * same / total:.0f} %)")


if __name__ == "__main__":
    main()
