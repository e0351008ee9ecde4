"""Query by box vs query by mask on the held-out split: the share of held-out tumors whose top-1
archive hit is the same when the query is a box drawn `--grow` too large (each side grown by that
share of the tumor's extent, about the tumor's centre) as when it is the tumor's mask; also the share
whose box top-1 is among the mask query's top 5, and the mean overlap of the two top-5 lists.

    .venv/bin/python benchmarks/box_query.py --model M --embeddings E --manifest X --secret-file K [--grow 0.2]
        [--on validation] [--rerank M] [--given-count]

Both queries name the tumor's patient (`patient_key`), so neither returns that patient's own archived
tumors (the query scan itself is in the archive: without it, both top-1s would mostly be the query).
`--on validation`: the model's validation patients (to compare searches without the test);
`--rerank M`: search with that many first-stage candidates instead of the model's recipe (0: one stage);
`--given-count`: a recipe that reads the scan's tumor count (retrieval.scan_count) is given the mask's
count, as a clinician who counted the lesions would (`search --scan-tumors`), instead of leaving it
unknown (the refit heads fit without the count then read the box).
"""

from __future__ import annotations

import argparse

from retrieval.search import search, search_box
from tumornet.boxes import grown_box_mm
from tumornet.export import load_model
from tumornet.keys import patient_key, read_secret
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
    p.add_argument("--given-count", action="store_true", help="give each box query its scan's tumor count from the "
                   "mask (as `search --scan-tumors` does) instead of leaving it unknown")
    args = p.parse_args()
    secret = read_secret(args.secret_file)
    _, meta = load_model(args.model)
    cohort = read_manifest(args.manifest)
    _, held_out = split_of_model(cohort, meta, where=args.model, on=args.on)
    scans = cohort.scans()
    same = within = overlap = total = 0
    for s in held_out:
        rows = list(scans[s])
        mine = patient_key(rows[0].patient_id, secret)
        by_mask = search(args.model, args.embeddings, rows, k=5, rerank=args.rerank, patient_key=mine)
        tumors = {t.tumor_id: t for t in load_scan(rows, spacing_mm=meta["extra"]["spacing_mm"]).tumors}
        for q, r in zip(by_mask, rows, strict=True):
            (b,) = search_box(args.model, args.embeddings, r.image, grown_box_mm(tumors[r.tumor_id].bbox_mm, args.grow),
                              k=5, rerank=args.rerank, patient_key=mine,
                              scan_tumors=len(rows) if args.given_count else None)
            top_mask, top_box = ([(h["scan_key"], h["tumor_id"]) for h in x["hits"]] for x in (q, b))
            same += top_mask[0] == top_box[0]
            within += top_box[0] in top_mask
            overlap += len(set(top_mask) & set(top_box)) / len(top_mask)
            total += 1
    print(f"box {100 * args.grow:.0f} % larger than the tumor, {total} {args.on} tumors, other patients only: "
          f"the same top-1 as the mask query {same} ({100 * same / total:.0f} %); its top-1 in the mask's top-5 "
          f"{within} ({100 * within / total:.0f} %); top-5 overlap {overlap / total:.2f}")


if __name__ == "__main__":
    main()
