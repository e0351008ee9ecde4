"""The HTML report: rendered from a small embedded archive, then loaded in headless Chromium."""

import json
import re
import shutil
import subprocess

import pytest

from conftest import SECRET
from retrieval.detection import detection_quality
from retrieval.evaluate import evaluate
from retrieval.report import SECTIONS, build_report
from retrieval.robustness import robustness

pytestmark = pytest.mark.slow


def _chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def report(archive, small_cohort, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    metrics = [{"step": 2 * e, "epoch": e, "train/loss": 1.0 / e, "train/loss_seg": 0.5 / e, "val/loss": 1.1 / e,
                "val/dice": 0.2 * e, "val/acc_tumor_type": 0.3 + 0.1 * e} for e in range(1, 4)]
    (archive / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    ev = evaluate(archive / "emb", small_cohort, SECRET, archive / "model.pt", k=5, ks=[1, 5, 10])
    ev["robustness"] = robustness(archive / "model.pt", archive / "emb", small_cohort, SECRET, k=5, draws=1)
    ev["detection"] = detection_quality(archive / "model.pt", small_cohort)
    exp = {"title": "Channel width (paper Tab. 2)", "k": 5, "tasks": ev["tasks"],
           "rows": [{"variant": "c8", "model_id": ev["model_id"], "steps": 0, "wall_s": 1.0, "split": ev["split"],
                     **{r: ev["rows"][r] for r in ("learned", "handcrafted", "no_embedding")}}]}
    html = build_report(model=archive / "model.pt", embeddings=archive / "emb", manifest=small_cohort, secret=SECRET,
                        out_dir=out, evaluation=ev, experiments=[exp], summary={"patients": 24})
    return html, ev


def test_report_and_results_hold_every_section_and_no_patient_id(report):
    html, ev = report
    text = html.read_text()
    for sid in SECTIONS:
        assert f'<section id="{sid}">' in text
    imgs = re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,', text)
    assert {"K curve", "t-SNE", "training curves", "retrieval example 1"} <= set(imgs)
    assert "http://" not in text and "https://" not in text  # self-contained
    assert "SYN003-" not in text  # keyed ids only
    res = json.loads(html.with_name("results.json").read_text())
    assert "SYN003-" not in html.with_name("results.json").read_text()
    for row in ("learned", "handcrafted", "no_embedding"):
        for t in ev["tasks"]:
            for m in ("acc", "precision", "map"):
                v = res["rows"][row][f"{m}_{t}"]
                assert v is None or 0 <= v <= 1
        assert res["rows"][row]["rmse_size_mm"] > 0
    assert res["k"] == 5 and res["robustness"]["draws"] == 1 and res["experiments"][0]["rows"][0]["variant"] == "c8"
    assert res["detection"]["scans"] == ev["detection"]["scans"] > 0
    assert f"Detection on {ev['detection']['scans']} test scans" in text
    assert res["provenance"]["model_id"] == ev["model_id"] and res["provenance"]["versions"]["torch"]


def test_report_loads_in_headless_chromium(report, tmp_path):
    exe = _chromium()
    if exe is None:
        pytest.skip("chromium is not installed (make test installs Debian's chromium where apt-get can)")
    html, _ = report
    n = len(re.findall(r"<img ", html.read_text()))
    r = subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0",
                        f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000", "--dump-dom",
                        html.as_uri()], capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    for sid in SECTIONS:
        assert f'id="{sid}"' in r.stdout
    assert f'data-images-loaded="{n}/{n}"' in r.stdout  # every figure decoded by the browser
    console_errors = [line for line in r.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert not console_errors, console_errors


def test_retrieval_example_captions_fit_their_column(archive, small_cohort, monkeypatch):
    """A caption's label line is wrapped to the column (five labels of a meningioma overlapped the next
    column), and every panel names its tumor by key, never by patient id."""
    from retrieval import report as rep
    from retrieval.evaluate import load_evaluation

    seen = []
    monkeypatch.setattr(rep.figures, "retrieval_figure", lambda panels: seen.append(panels) or "data:")
    ev = load_evaluation(archive / "emb", small_cohort, SECRET, archive / "model.pt", on="test")
    assert [uri for uri, _ in rep._examples(ev, small_cohort, SECRET, queries=2, hits=3)] == ["data:"] * len(seen)
    captions = [p["caption"] for panels in seen for p in panels]
    assert len(seen) >= 1 and len(captions) >= 2
    assert all(len(line) <= rep.CAPTION_WIDTH for c in captions for line in c.splitlines()[2:])
    assert any(len(c.splitlines()) > 3 for c in captions)  # some label list was long enough to wrap
    assert not any("SYN" in c for c in captions)


def test_retrieval_examples_count_what_the_hits_say(archive, small_cohort, monkeypatch):
    """Under each example, search's `among these N` line: the hits' labels and case information counted
    (a hit without the information counted as not recorded), read from the archive rows shown."""
    import dataclasses

    import numpy as np
    import pyarrow as pa

    from retrieval import report as rep
    from retrieval.evaluate import load_evaluation
    from retrieval.knn import neighbours
    from retrieval.search import NOT_RECORDED
    from tumornet.labels import MISSING

    monkeypatch.setattr(rep.figures, "retrieval_figure", lambda panels: "data:")
    ev = load_evaluation(archive / "emb", small_cohort, SECRET, archive / "model.pt", on="test")
    n = ev.table.num_rows
    outcome = ["local control" if i % 3 else None for i in range(n)]
    ev = dataclasses.replace(ev, table=ev.table.append_column("info_outcome", pa.array(outcome, pa.string())))
    got = rep._examples(ev, small_cohort, SECRET, queries=1, hits=3)
    assert len(got) == 1
    # the query: the first held-out tumor of the first type, as _examples chooses it
    types = ev.test.labels["tumor_type"]
    q = int(np.flatnonzero(types == min(set(types.tolist()) - {MISSING}))[0])
    hits = [int(j) for j in neighbours(ev.train, ev.test, 3, rerank=ev.rerank)[q] if j >= 0]
    rows = [int(ev.train_rows[j]) for j in hits]
    controlled = sum(outcome[r] is not None for r in rows)
    line = got[0][1]
    assert line.startswith(f"among these {len(hits)}: tumor_type ")
    names = ev.meta["tasks"]["tumor_type"]
    for cls in {int(ev.train.labels["tumor_type"][j]) for j in hits}:
        count = sum(int(ev.train.labels["tumor_type"][j]) == cls for j in hits)
        assert f"{names[cls]} {count}" in line
    parts = [p for p in ([f"local control {controlled}"] if controlled else [])
             + ([f"{NOT_RECORDED} {len(hits) - controlled}"] if controlled < len(hits) else [])]
    assert line.endswith("outcome " + ", ".join(sorted(parts, key=lambda p: (-int(p.rsplit(' ', 1)[1]), p))))
    assert "SYN" not in line
