"""Search: the archive tumors most similar to a query tumor (`ray_job.py search`).

Queries: a new scan with its tumor mask (every tumor of it), a new scan with a box drawn around the
tumor (the paper's query; no mask needed), or an archived tumor by `SCAN_KEY:TUMOR_ID`. A new scan
(any orientation and spacing) is embedded exactly as the archive was (same model, its spacing,
patch and retrieval recipe); each query gets the K archive tumors nearest to it (Euclidean), never
from its own patient when that is known, optionally only tumors with given labels (`--where`).
The query itself is never written anywhere.
"""

from __future__ import annotations

import sys
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np

from embedder.embed import embed_scan, embed_settings, load_detector
from embedder.shards import case_info, read_embeddings
from tumornet.boxes import box_mm_extent, box_mm_to_voxels, grown_box_mm
from tumornet.descriptor import compose, predicted_classes, recipe_of, refine_box, tumor_parts
from tumornet.drawn import drawn_fit_of, with_drawn_size
from tumornet.errors import InputError
from tumornet.export import load_model
from tumornet.fitted import require_uncounted
from tumornet.labels import INFO_PREFIX, MISSING, is_info_column
from tumornet.manifest import ManifestRow
from tumornet.register import register
from tumornet.scans import read_instances
from tumornet.volumes import load_volume, read_label_map

from .index import VECTOR_COLUMNS, load_index
from .knn import nearest, recipe_rerank

QUERY_KEY = b"query-scan-no-patient-key"  # the query's keys are computed, never output


def query_rows(image: str | Path, mask: str | Path | None, *, binary: bool = False,
               tumor_ids=None) -> list[ManifestRow]:
    """The query scan as manifest rows, one per tumor: an instance mask (each value a tumor) or,
    with binary, every connected component of the non-zero voxels; no mask: one row, the tumors
    found by the model's segmentation head (tumornet.detect)."""
    image = Path(image).resolve()
    mask = Path(mask).resolve() if mask is not None else None
    for p in (image, mask):
        if p is not None and not p.is_file():
            raise InputError(f"{p}: file not found")
    if mask is None:
        return [ManifestRow(row=0, patient_id="query", scan_id="query", image=image, mask=None, tumor_id=0, labels={})]
    values = None
    if binary:
        raw, _ = read_label_map(mask)
        values = tuple(int(v) for v in np.unique(raw) if v != 0)
    first = ManifestRow(row=0, patient_id="query", scan_id="query", image=image, mask=mask, tumor_id=0, labels={},
                        tumor_values=values)
    ids = [int(v) for v in np.unique(read_instances(first)[0]) if v != 0]
    if tumor_ids:
        missing = sorted(set(tumor_ids) - set(ids))
        if missing:
            raise InputError(f"{mask}: no tumor {missing} in the mask (it has {ids})")
        ids = [i for i in ids if i in set(tumor_ids)]
    if not ids:
        raise InputError(f"{mask}: empty mask (no tumor voxel)")
    return [replace(first, tumor_id=i) for i in ids]


def _names(schema, row: dict, prefix: str) -> dict:
    return {t: (schema[t].classes[row[f"{prefix}_{t}"]] if row[f"{prefix}_{t}"] != MISSING else None)
            for t in schema.names}


def parse_where(items, schema) -> dict[str, int | str]:
    """`task=class` filters (e.g. tumor_type=schwannoma) -> {task: class index}, and `info_COLUMN=value`
    filters on the case information (e.g. info_outcome=local control: that cell exactly, case and
    surrounding spaces aside; info_outcome=* : any non-empty cell) -> {info_COLUMN: value}."""
    out: dict[str, int | str] = {}
    for item in items or ():
        task, _, cls = item.partition("=")
        if is_info_column(task):
            if not cls.strip():
                raise InputError(f"--where {item!r}: give a value (or * for any)")
            out[task] = cls.strip().lower()
            continue
        if task not in schema:
            raise InputError(f"--where {item!r}: unknown task {task!r}; tasks: {list(schema.names)}, or "
                             f"{INFO_PREFIX}COLUMN for case information")
        try:
            out[task] = schema[task].index(cls)
        except InputError:
            raise InputError(f"--where {item!r}: unknown class {cls!r}; {task} classes: "
                             f"{list(schema[task].classes)}") from None
        if out[task] == MISSING:
            raise InputError(f"--where {item!r}: give a class; {task} classes: {list(schema[task].classes)}")
    return out


def _passes_where(a: dict, where: dict) -> bool:
    """An archive row passes the label and case information filters of parse_where."""
    for key, want in where.items():
        if key.startswith(INFO_PREFIX):
            cell = (a.get(key) or "").strip().lower()
            if not cell or (want != "*" and cell != want):
                return False
        elif a[f"label_{key}"] != want:
            return False
    return True


def _archive(model_path, emb_dir, rerank: int | None = None):
    """-> (model, meta, Archive): the model's index when it is current, else its shard rows; `rerank`:
    search with that many first-stage candidates instead of the recipe's (0: one stage)."""
    model, meta = load_model(model_path)
    mid = meta["model_id"]
    recipe = recipe_of(meta)[0]
    index = load_index(emb_dir, mid)
    if index is not None:
        return model, meta, Archive(index.table, index.search, index.index.reconstruct,
                                    recipe_rerank(recipe, meta, index.index.d, str(emb_dir), candidates=rerank))
    table = read_embeddings(emb_dir, model_id=mid)
    if table.num_rows == 0:
        raise InputError(f"{emb_dir}: no tumor embedded with model {mid}; embed the archive with this model first")
    x = np.stack(table["embedding"].to_numpy(zero_copy_only=False)).astype(np.float32)
    return model, meta, Archive(table, lambda q, n: nearest(x, q, n), lambda i: x[i],
                                recipe_rerank(recipe, meta, x.shape[1], str(emb_dir), candidates=rerank))


class Archive:
    """The archive's rows (without vectors), a search function (q (n, D), n) -> (distances, row
    indices), nearest first, and a row's vector: the FAISS index, or brute force over the shards; and
    the recipe's second search stage (retrieval.knn.recipe_rerank; None: one stage)."""

    def __init__(self, table, search_fn, vector_fn, rerank=None):
        self.rows = table.drop_columns([c for c in VECTOR_COLUMNS if c in table.column_names]).to_pylist()
        self.search, self.vector, self.rerank = search_fn, vector_fn, rerank


def rank(model, archive: Archive, queries: list[dict], *, k: int, where: dict | None = None) -> list[dict]:
    """queries: {"embedding", "patient_key" (None: unknown), ...shown fields} -> each with its `hits`:
    the k nearest archive tumors, never from the query's own patient, among the rows that pass the
    label filters (the candidate list grows until k pass or the archive is exhausted). A recipe with a
    second stage (`retrieval.rerank` M) takes the M nearest that pass and re-orders them by its
    distance (`rerank_distance`), as the evaluation does (retrieval.knn.neighbours)."""
    if k < 1:
        raise InputError(f"--k: expected >= 1, got {k}")
    n = len(archive.rows)
    m, scales = archive.rerank or (0, None)
    need = max(k, m)

    def passes(a: dict, q: dict) -> bool:
        if q.get("patient_key") is not None and a["patient_key"] == q["patient_key"]:
            return False  # never the query's own patient
        return _passes_where(a, where or {})

    out = []
    for q in queries:
        want = need if not where and q.get("patient_key") is None else 4 * need
        qx = np.asarray(q["embedding"], dtype=np.float32)
        while True:
            d, idx = archive.search(qx[None], min(want, n))
            hits = []
            for dist, j in zip(d[0], idx[0], strict=True):
                a = archive.rows[j]
                if j < 0 or not passes(a, q):
                    continue
                hits.append({"distance": float(dist), "scan_key": a["scan_key"], "patient_key": a["patient_key"],
                             "tumor_id": a["tumor_id"], "size_mm": a["size_mm"],
                             "labels": _names(model.schema, a, "label"),
                             "info": case_info(a), "row": int(j)})
                if len(hits) == need:
                    break
            if len(hits) == need or want >= n:
                break
            want *= 4
        if scales is not None:
            for h in hits[:m]:
                h["rerank_distance"] = float(np.sqrt((((archive.vector(h["row"]) - qx) * scales) ** 2).sum()))
            hits[:m] = sorted(hits[:m], key=lambda h: h["rerank_distance"])  # stable: ties keep the first order
        hits = [{"rank": r, **{key: v for key, v in h.items() if key != "row"}} for r, h in enumerate(hits[:k], 1)]
        if where and not hits:
            raise InputError("no archive tumor passes the --where filters")
        out.append({k_: v for k_, v in q.items() if k_ not in ("embedding", "patient_key")}
                   | {"hits": hits, "among_hits": among_hits(hits)})
    return out


NOT_RECORDED = "(not recorded)"


def among_hits(hits: list[dict]) -> dict[str, dict[str, int]]:
    """What the hits say, counted, most frequent first: per task its classes (unlabeled hits left out),
    and per case-information column its values, the hits without one counted as NOT_RECORDED (how the
    retrieved tumors went: e.g. {"outcome": {"local control": 3, "progression": 1, "(not recorded)": 1}})."""
    counts: dict[str, Counter] = {}
    for h in hits:
        for task, v in h["labels"].items():
            if v:
                counts.setdefault(task, Counter())[v] += 1
    for col in sorted({c for h in hits for c in h.get("info", {})}):
        counts[col] = Counter(h.get("info", {}).get(col) or NOT_RECORDED for h in hits)
    return {col: dict(sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))) for col, c in counts.items()}


def format_among(counts: dict[str, dict[str, int]], n: int) -> str:
    """among_hits as one line: `among these 5: tumor_type schwannoma 4, meningioma 1; outcome ...`."""
    said = "; ".join(f"{col} " + ", ".join(f"{v} {c}" for v, c in vals.items()) for col, vals in counts.items())
    return f"among these {n}: {said}"


def search(model_path, emb_dir, rows: list[ManifestRow], *, k: int = 5, where=None, rerank=None,
           patient_key: str | None = None, detector=None) -> list[dict]:
    """A new scan with its tumor mask (or none: the tumors the model finds) -> one entry per tumor: its
    size, predicted labels and hits (`rerank`: as _archive, for every query form; `patient_key`: the
    query's patient as the archive keys it (embedder: keyed_id of the patient id with the site key),
    whose archived tumors are then never returned, for every query form; None: unknown; `detector`: a
    model file that finds the tumors of a scan without a mask instead of the model's own head, at its
    own detect settings: embedder.embed.load_detector)."""
    model, meta, archive = _archive(model_path, emb_dir, rerank)
    spacing, patch, recipe = embed_settings(meta, model_path)
    net, _, detect = load_detector(detector if rows[0].mask is None else None, meta, spacing)
    queries = embed_scan(model, meta["model_id"], rows, spacing_mm=spacing, patch_size=patch, secret=QUERY_KEY,
                         file_hash="", recipe=recipe, detect=detect, detector=net)
    if not queries:
        raise InputError(f"{rows[0].image}: the model found no tumor in this scan (give --mask or --box)")
    return rank(model, archive, [{"tumor_id": q["tumor_id"], "size_mm": q["size_mm"],
                                "predicted": _names(model.schema, q, "pred"), "embedding": q["embedding"],
                                "patient_key": patient_key} for q in queries],
                k=k, where=parse_where(where, model.schema))


def drawn_box_parts(model, vol, box_mm, *, cfg, patch_size: int, where, scan_tumors: int | None = None,
                    frame=None, drawn_fit=None) -> dict:
    """The parts of a box drawn on a scan (`vol` at the model's spacing; world mm, RAS) as a search by box
    reads them (tumornet.descriptor.tumor_parts): pooled over the voxels that cover the box (refined first
    when the recipe says refine_box), its size the drawn box's own (the covering voxels can be one more
    on each side: a 10 mm box on a 2 mm grid covers up to 14 mm, 2.7x its volume), and so is the size of
    the segmented volume's fallback where the segmentation finds nothing in the box. `scan_tumors`: how
    many tumors the scan holds, where the recipe reads it (retrieval.scan_count); None: unknown, and the
    refit heads fit without the count read the box (nineteenth round: on validation the segmentation
    head's count cost a box query more than no count at all). `frame`: the scan's registration onto the
    template where the caller has it (several boxes of one scan; not with frame_skips_tumors, whose
    registration depends on the box); None: registered here where the recipe needs it. `drawn_fit`: the model's
    drawn-box size regression (tumornet.drawn.drawn_fit_of) where the recipe's drawn_read is fit."""
    if scan_tumors is not None and (isinstance(scan_tumors, bool) or not isinstance(scan_tumors, int)
                                    or scan_tumors < 1):
        raise InputError(f"--scan-tumors: expected a whole number >= 1 (the tumors in the scan), got {scan_tumors!r}")
    if scan_tumors is not None and not cfg.scan_count:
        print(f"warning: --scan-tumors {scan_tumors} has no effect: this model's recipe does not read the scan's "
              "tumor count (retrieval.scan_count: false)", file=sys.stderr)
    vbox = box_mm_to_voxels(box_mm, vol.affine, vol.array.shape)
    if np.any(vbox[3:] <= vbox[:3]):
        raise InputError(f"{where}: the box {np.asarray(box_mm).tolist()} mm lies outside the scan")
    drawn = vbox
    if cfg.refine_box:  # the box of the tumor the segmentation head finds in the drawn one
        vbox = refine_box(model, vol.array, vbox, patch_size=patch_size)
    if frame is not None and cfg.frame_skips_tumors:
        raise InputError(f"{where}: a registration given for a recipe whose registration leaves the drawn box out "
                         "(retrieval.frame_skips_tumors)")
    if frame is None and cfg.needs_frame:
        frame = register(vol.array, vol.affine, warp_mm=cfg.warp_mm,
                         ignore=[drawn, vbox] if cfg.frame_skips_tumors else None)
    if scan_tumors is None and not cfg.scan_count:
        scan_tumors = 1  # read by no head
    parts = tumor_parts(model, vol.array, vbox, patch_size=patch_size, spacing_mm=vol.spacing_mm, frame=frame,
                        extent=box_mm_extent(box_mm, vol.affine, vol.array.shape) if vbox is drawn else None,
                        scan_tumors=scan_tumors, mirror=cfg.mirror)
    # a box as drawn reads its size partly from the tumor the segmentation sees in it (retrieval.drawn_size)
    if vbox is not drawn or not cfg.drawn_size:
        return parts
    fit = drawn_fit if drawn_fit is not None else drawn_fit_of(cfg, None, str(where))
    return with_drawn_size(parts, cfg.drawn_size, vol.spacing_mm, fit)


def search_box(model_path, emb_dir, image, box_mm, *, k: int = 5, where=None, rerank=None,
               patient_key: str | None = None, scan_tumors: int | None = None) -> list[dict]:
    """The paper's query: a new scan and a box drawn around the tumor, (x0, y0, z0, x1, y1, z1) in
    world millimetres (RAS) -> one entry (size unknown: no mask). `scan_tumors`: how many tumors the
    scan holds, where the recipe reads it (drawn_box_parts; None: unknown)."""
    box_mm = np.asarray(box_mm, dtype=np.float64)
    if box_mm.shape != (6,) or np.any(box_mm[3:] <= box_mm[:3]):
        raise InputError(f"--box: expected x0,y0,z0,x1,y1,z1 in mm with x0 < x1, y0 < y1, z0 < z1, "
                         f"got {box_mm.tolist()}")
    model, meta, archive = _archive(model_path, emb_dir, rerank)
    spacing, patch, (cfg, stats) = embed_settings(meta, model_path)
    if scan_tumors is None and cfg.scan_count and cfg.tasks > 0 and cfg.heads == "refit":
        require_uncounted(stats, str(model_path))
    fit = drawn_fit_of(cfg, stats, str(model_path))
    parts = drawn_box_parts(model, load_volume(image, scan_id="query", spacing_mm=spacing), box_mm, cfg=cfg,
                            patch_size=patch, where=image, scan_tumors=scan_tumors, drawn_fit=fit)
    one = {key: np.asarray(v)[None] for key, v in parts.items()}
    vector = compose(one, cfg, model.schema, stats)[0]
    classes = predicted_classes(one, cfg, model.schema, stats)
    predicted = {t.name: t.classes[int(classes[t.name][0])] for t in model.schema.tasks}
    # the size the box was read as (its volume part, after retrieval.drawn_size): the equivalent diameter of
    # the ellipsoid inscribed in it, comparable with the hits' size_mm
    read_mm = float(np.cbrt(np.exp(parts["box_log_volume"]) * 1000.0))
    return rank(model, archive, [{"tumor_id": None, "box_mm": box_mm.tolist(), "size_mm": None,
                                  "box_read_mm": read_mm, "predicted": predicted, "embedding": vector,
                                  "patient_key": patient_key}], k=k, where=parse_where(where, model.schema))


def search_archived(model_path, emb_dir, tumor: str, *, k: int = 5, where=None, rerank=None) -> list[dict]:
    """An archived tumor, `SCAN_KEY:TUMOR_ID` -> its hits, never from its own patient."""
    scan_key, _, tid = tumor.partition(":")
    try:
        tumor_id = int(tid)
    except ValueError:
        raise InputError(f"--tumor: expected SCAN_KEY:TUMOR_ID, got {tumor!r}") from None
    model, meta, archive = _archive(model_path, emb_dir, rerank)  # the index when current: no shard is read
    mine = [i for i, r in enumerate(archive.rows) if r["scan_key"] == scan_key and r["tumor_id"] == tumor_id]
    if not mine:
        raise InputError(f"--tumor {tumor}: no such tumor in {emb_dir} for model {meta['model_id']}")
    r = archive.rows[mine[0]]
    return rank(model, archive, [{"tumor_id": tumor_id, "scan_key": scan_key, "size_mm": r["size_mm"],
                                  "predicted": _names(model.schema, r, "pred"),
                                  "embedding": archive.vector(mine[0]), "patient_key": r["patient_key"]}],
                k=k, where=parse_where(where, model.schema))


def format_search(results: list[dict]) -> str:
    lines = []
    for q in results:
        pred = ", ".join(f"{t} {v}" for t, v in q["predicted"].items())
        what = (f"query tumor {q['tumor_id']}" if q.get("box_mm") is None else
                "query box " + ",".join(f"{v:.0f}" for v in q["box_mm"]) + " mm")
        size = "" if q.get("size_mm") is None else f": {q['size_mm']:.1f} mm"
        if q.get("box_read_mm") is not None:
            size = f" (read as a tumor about {q['box_read_mm']:.1f} mm across)"
        info = sorted({k for h in q["hits"] for k in h.get("info", {})})  # the case information the hits carry
        lines += [f"{what}{size}; predicted {pred}", "",
                  "| rank | distance | scan_key | tumor | size mm | " + " | ".join([*q["predicted"], *info]) + " |",
                  "|---|---|---|---|---|" + "---|" * (len(q["predicted"]) + len(info))]
        for h in q["hits"]:
            cells = [str(h["rank"]), f"{h['distance']:.3f}", h["scan_key"], str(h["tumor_id"]), f"{h['size_mm']:.1f}"]
            cells += [v or "?" for v in h["labels"].values()] + [h["info"].get(k, "") for k in info]
            lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
        if q["hits"]:
            lines += ["", format_among(q.get("among_hits", {}), len(q["hits"]))]
        lines.append("")
    return "\n".join(lines).rstrip()


def drawn_box_example(row: ManifestRow, spacing_mm, grow: float = 0.2) -> list[float]:
    """A box drawn around a manifest row's tumor as a user might: its mask's box in world mm, each side
    `grow` too large about its centre (the demo's box query)."""
    from tumornet.scans import load_scan

    (tumor,) = (t for t in load_scan([row], spacing_mm=spacing_mm).tumors if t.tumor_id == row.tumor_id)
    return grown_box_mm(tumor.bbox_mm, grow).tolist()


def held_out_example(manifest, model_path) -> ManifestRow:
    """The first scan of the model's held-out split: a query to try search with (the demo's)."""
    from tumornet.manifest import read_manifest
    from tumornet.split import split_of_model

    _, meta = load_model(model_path)
    cohort = read_manifest(manifest)
    _, held_out = split_of_model(cohort, meta, where=str(model_path))
    return cohort.scans()[held_out[0]][0]
