"""The report (`ray_job.py report`): one self-contained static HTML file (figures embedded as PNG
data URIs, no script or style from the network) plus `results.json`.

Sections: headline (learned vs handcrafted vs no embedding at K), the K curve (paper Fig. 4), the
tables (channel width Tab. 2, task ablation Tab. 3, box-distortion robustness Tab. 4), t-SNE of the
held-out embeddings (Fig. 5), retrieval examples (Fig. 6), training curves, provenance (config,
model id, data summary, versions). Tumors are named by keyed scan ids only.
"""

from __future__ import annotations

import datetime
import html
import importlib.metadata
import json
import platform
import textwrap
from pathlib import Path

import numpy as np

from embedder.shards import case_info
from tumornet.io import atomic_write_text
from tumornet.keys import keyed_id
from tumornet.labels import MISSING, LabelSchema, is_info_column
from tumornet.manifest import read_manifest
from tumornet.scans import load_scan

from . import figures
from .detection import format_detection
from .evaluate import ROWS, fmt_metric, load_evaluation, metric_keys, metric_label, plain
from .knn import neighbours
from .search import among_hits, format_among

CAPTION_WIDTH = 30  # characters of a retrieval example's caption line (fontsize 7 in a column of 5)

SECTIONS = ("summary", "k-curve", "tables", "tsne", "examples", "training", "provenance")
PACKAGES = ("torch", "ray", "deepspeed", "numpy", "nibabel", "pyarrow", "scikit-learn", "matplotlib")


def _table(head: list[str], rows: list[list[str]]) -> str:
    h = "".join(f"<th>{html.escape(c)}</th>" for c in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{h}</tr></thead><tbody>{body}</tbody></table>"


def metrics_table(rows: dict[str, dict], tasks, k: int) -> str:
    """Columns: the named rows (learned, handcrafted, ...); one line per metric."""
    names = list(rows)
    return _table(["metric", *[n.replace("_", " ") for n in names]],
                  [[metric_label(key, k), *[fmt_metric(rows[n].get(key), key) for n in names]]
                   for key in metric_keys(tasks)])


def experiment_table(exp: dict) -> str:
    """An experiment (retrieval.experiments): one line per variant, learned and handcrafted scores."""
    tasks, k = exp["tasks"], exp["k"]
    keys = [f"acc_{t}" for t in tasks] + [f"map_{t}" for t in tasks] + ["rmse_size_mm"]
    head = ["variant", "embedding", *[metric_label(key, k) for key in keys], "steps", "wall s", "model id"]
    lines = []
    for r in exp["rows"]:
        for emb in ("learned", "handcrafted"):
            lines.append([r["variant"], emb, *[fmt_metric(r[emb].get(key), key) for key in keys],
                          r["steps"], f"{r['wall_s']:.0f}", r["model_id"]])
    return _table(head, lines)


def robustness_table(rob: dict) -> str:
    return _table(["metric", "exact boxes", f"distorted boxes (mean +- sd of {rob['draws']} draws)"],
                  [[metric_label(key, rob["k"]), fmt_metric(rob["clean"][key], key),
                    f"{fmt_metric(rob['distorted_mean'][key], key)} +- {fmt_metric(rob['distorted_sd'][key], key)}"]
                   for key in metric_keys(rob["tasks"])])


def _examples(ev, manifest, secret: bytes, *, queries: int, hits: int) -> list[tuple[str, str]]:
    """Fig. 6: for one held-out tumor per type (up to `queries`), its `hits` nearest training tumors
    from other patients, drawn from the scans (model's working grid) -> (figure URI, what the hits say:
    search's `among these N` line, their labels and case information counted) per query."""
    meta = ev.meta
    spacing = meta["extra"].get("spacing_mm")
    schema = LabelSchema.from_dict(meta["tasks"])
    scans = read_manifest(manifest, schema, check_files=False).scans()
    by_key = {keyed_id(s, secret): rows for s, rows in scans.items()}
    keys, tids = ev.table["scan_key"].to_pylist(), ev.table["tumor_id"].to_pylist()
    emb = np.stack(ev.table["embedding"].to_numpy(zero_copy_only=False)).astype(np.float32)
    train_rows, test_rows = ev.train_rows, ev.test_rows
    types = ev.test.labels.get("tumor_type", np.full(len(test_rows), MISSING))
    chosen = []
    for cls in sorted(set(types.tolist()) - {MISSING}) or [MISSING]:
        chosen.append(int(np.flatnonzero(types == cls)[0]))
    chosen = chosen[:queries]
    nb = neighbours(ev.train, ev.test, hits, rerank=ev.rerank)
    cache: dict[str, object] = {}
    info_cols = [c for c in ev.table.column_names if is_info_column(c)]
    info = ev.table.select(info_cols).to_pylist() if info_cols else [{}] * ev.table.num_rows

    def said(j: int) -> dict:  # a training tumor as among_hits reads a search hit
        labels = {t: schema[t].classes[v] for t, a in ev.train.labels.items()
                  if t in schema and (v := int(a[j])) != MISSING}
        return {"labels": labels, "info": case_info(info[train_rows[j]])}

    def panel(row: int, title: str, extra: str) -> dict:
        key, tid = keys[row], tids[row]
        if key not in cache:
            cache[key] = load_scan(by_key[key], spacing_mm=spacing)
        scan = cache[key]
        tumor = next(t for t in scan.tumors if t.tumor_id == tid)
        labels = ", ".join(schema[t].classes[v] for t, v in tumor.labels.items() if v != MISSING and t in schema)
        labels = textwrap.fill(labels, CAPTION_WIDTH, break_long_words=False)  # captions never overlap
        return {"title": title, "views": figures.tumor_views(scan.volume.array, scan.instances, tid, tumor.bbox),
                "caption": f"{key}:{tid}\n{tumor.size_mm:.1f} mm{extra}\n{labels}"}

    out = []
    for q in chosen:
        panels = [panel(int(test_rows[q]), "query (held out)", "")]
        found = [int(j) for j in nb[q] if j >= 0]
        for rank, j in enumerate(nb[q], start=1):
            if j >= 0:
                d = float(np.linalg.norm(emb[train_rows[j]] - emb[test_rows[q]]))
                panels.append(panel(int(train_rows[j]), f"#{rank}", f", d = {d:.2f}"))
        out.append((figures.retrieval_figure(panels), format_among(among_hits([said(j) for j in found]), len(found))))
    return out


def versions() -> dict:
    out = {"python": platform.python_version()}
    for p in PACKAGES:
        try:
            out[p] = importlib.metadata.version(p)
        except importlib.metadata.PackageNotFoundError:
            out[p] = None
    return out


def build_report(*, model, embeddings, manifest, secret: bytes, out_dir, evaluation: dict,
                 experiments: list[dict] = (), summary: dict | None = None, metrics_file=None,
                 examples: int = 3, hits: int = 4) -> Path:
    """Write `<out_dir>/report.html` and `<out_dir>/results.json`; -> the HTML path."""
    out = Path(out_dir)
    ev = load_evaluation(embeddings, manifest, secret, model)
    meta = ev.meta
    schema = LabelSchema.from_dict(meta["tasks"])
    k, tasks = evaluation["k"], evaluation["tasks"]
    metrics_file = Path(metrics_file) if metrics_file else Path(model).parent / "metrics.jsonl"
    records = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()] \
        if metrics_file.is_file() else []
    prov = {"model_id": meta["model_id"], "run": meta["extra"].get("run"), "steps": meta["extra"].get("steps"),
            "config": meta["extra"].get("config"), "split": evaluation["split"], "data_summary": summary,
            "versions": versions(), "generated_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
    results = {"model_id": meta["model_id"], "k": k, "tasks": tasks,
               "train_tumors": evaluation["train_tumors"], "test_tumors": evaluation["test_tumors"],
               "rows": evaluation["rows"], "k_curve": evaluation["k_curve"],
               "robustness": evaluation.get("robustness"), "detection": evaluation.get("detection"),
               "experiments": list(experiments), "provenance": prov}
    types = ev.test.labels.get("tumor_type", np.full(len(ev.test.x), MISSING))
    type_names = schema["tumor_type"].classes if "tumor_type" in schema else ()
    parts = {
        "summary": ("Retrieval scores", f"<p>{evaluation['test_tumors']} held-out tumors searched among "
                    f"{evaluation['train_tumors']} training tumors of other patients (K = {k}). The learned "
                    "embedding is only worth shipping where it beats the handcrafted row; the oracle knows every "
                    "tumor's true labels and size (the shared labels first, then the closest size): the best this "
                    "archive allows.</p>"
                    + metrics_table({r: evaluation["rows"][r] for r in ROWS if r in evaluation["rows"]}, tasks, k)),
        "k-curve": ("K curve (paper Fig. 4)", f'<img alt="K curve" src="{figures.k_curve_figure(evaluation)}">'),
        "tables": ("Tables (paper Tab. 2-4)", "".join(
            f"<h3>{html.escape(e['title'])}</h3>{experiment_table(e)}" for e in experiments)
            + ("<h3>Robustness to distorted boxes (Tab. 4, eq. 2)</h3>" + robustness_table(evaluation["robustness"])
               if evaluation.get("robustness") else "")
            + ("<h3>Tumors found without masks</h3><p>" + html.escape(format_detection(evaluation["detection"]))
               + "</p>" if evaluation.get("detection") else "")
            + ("" if experiments else "<p>No width or ablation experiment in this report: run "
               "<code>ray_job.py experiment</code> and pass its tables with <code>--experiment</code>.</p>")),
        "tsne": ("t-SNE of the held-out embeddings (Fig. 5)",
                 f'<img alt="t-SNE" src="{figures.tsne_figure(ev.test.x, ev.test.size_mm, types, type_names)}">'),
        "examples": ("Retrieval examples (Fig. 6)", "".join(
            f'<img alt="retrieval example {i + 1}" src="{uri}"><p class="among">{html.escape(among)}</p>'
            for i, (uri, among) in enumerate(_examples(ev, manifest, secret, queries=examples, hits=hits)))),
        "training": ("Training curves", f'<img alt="training curves" src="{figures.training_figure(records)}">'
                     if records else "<p>No metrics.jsonl beside the model.</p>"),
        "provenance": ("Provenance", _table(["", ""], [["model id", prov["model_id"]], ["run", prov["run"]],
                                                        ["steps", prov["steps"]], ["split", json.dumps(prov["split"])],
                                                        *[[p, v] for p, v in prov["versions"].items()],
                                                        ["generated", prov["generated_at"]]])
                       + "<h3>Config</h3><pre>" + html.escape(json.dumps(prov["config"], indent=2)) + "</pre>"
                       + ("<h3>Data summary</h3><pre>" + html.escape(json.dumps(summary, indent=2)) + "</pre>"
                          if summary else "")),
    }
    body = "".join(f'<section id="{sid}"><h2>{html.escape(title)}</h2>{content}</section>'
                   for sid, (title, content) in ((s, parts[s]) for s in SECTIONS))
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Tumor retrieval report: model {meta['model_id']}</title>
<style>
body {{ font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1250px; color: #222; }}
table {{ border-collapse: collapse; margin: 0.6em 0; font-size: 13px; }}
td, th {{ border: 1px solid #ccc; padding: 3px 8px; text-align: right; }}
td:first-child, th:first-child {{ text-align: left; }}
img {{ max-width: 100%; display: block; margin: 0.6em 0; }}
pre {{ background: #f6f6f6; padding: 0.8em; overflow: auto; max-height: 30em; }}
</style></head>
<body><h1>Brain tumor retrieval: model {meta['model_id']}</h1>{body}
<script>
window.addEventListener("load", () => {{
  const imgs = Array.from(document.images);
  document.body.dataset.imagesLoaded = imgs.filter(i => i.complete && i.naturalWidth > 0).length + "/" + imgs.length;
}});
</script></body></html>
"""
    atomic_write_text(out / "results.json", json.dumps(plain(results), indent=2))
    return atomic_write_text(out / "report.html", page)
