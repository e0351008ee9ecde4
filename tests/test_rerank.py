"""The two-stage search (`retrieval.rerank`): the M nearest re-ordered with the size / position weighed
again, the same in the evaluation (retrieval.knn) and in search (retrieval.search.rank)."""

from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest

from retrieval.knn import Split, knn_scores, neighbours, recipe_rerank
from tumornet.descriptor import block_slices, compose, rerank_scales, vector_size
from tumornet.errors import InputError
from tumornet.labels import DEFAULT_SCHEMA
from tumornet.recipe import RetrievalConfig


def _line_db():
    # column 0: "what the tumor is", column 1: its size part; the query sits at (0, 0)
    x = np.array([[0.0, 0.5], [0.6, 0.0], [0.7, 0.1], [0.3, 0.9], [3.0, 0.0]])
    return Split(x=x, labels={"t": np.array([0, 0, 0, 1, 1])}, size_mm=np.array([40.0, 10.0, 20.0, 30.0, 10.0]),
                 patients=np.array(["a", "b", "c", "d", "e"]))


def test_rerank_reorders_only_the_first_stage_candidates():
    db = _line_db()
    q = Split(x=np.zeros((1, 2)), labels={"t": np.array([0])}, size_mm=np.array([10.0]), patients=np.array(["q"]))
    assert neighbours(db, q, 4).tolist() == [[0, 1, 2, 3]]  # one stage: by the whole distance
    # the 3 nearest re-ordered with the size counted 10x (squared: 0.36, 1.49, 25): 1, 2, 0
    scales = np.array([1.0, 10.0])
    assert neighbours(db, q, 3, rerank=(3, scales)).tolist() == [[1, 2, 0]]
    # a 4th beyond the candidates keeps its place after them; row 4 (size part 0, far away) never enters
    assert neighbours(db, q, 4, rerank=(3, scales)).tolist() == [[1, 2, 0, 3]]
    assert neighbours(db, q, 2, rerank=(3, scales)).tolist() == [[1, 2]]
    assert neighbours(db, q, 3, rerank=(1, scales)).tolist() == [[0, 1, 2]]  # M = 1: one stage
    # the query's own patient is not a candidate in either stage
    own = Split(x=q.x, labels=q.labels, size_mm=q.size_mm, patients=np.array(["b"]))
    assert neighbours(db, own, 3, rerank=(3, scales)).tolist() == [[2, 0, 3]]
    # fewer candidates than asked: -1 stays last
    assert neighbours(db.subset(np.array([0, 1])), q, 3, rerank=(3, scales)).tolist() == [[1, 0, -1]]
    # the scores follow the re-ordered neighbours: sizes 40 -> 10 at K = 1, (40 + 10) -> (10 + 20) at K = 2
    assert knn_scores(db, q, [1], ["t"])[1]["rmse_size_mm"] == pytest.approx(30.0)
    assert knn_scores(db, q, [1], ["t"], rerank=(3, scales))[1]["rmse_size_mm"] == pytest.approx(0.0)
    assert knn_scores(db, q, [2], ["t"], rerank=(3, scales))[2]["rmse_size_mm"] == pytest.approx(5.0)
    assert knn_scores(db, q, [2], ["t"])[2]["rmse_size_mm"] == pytest.approx(15.0)


def test_rerank_scales_follow_the_vector_layout():
    cfg = RetrievalConfig(roipool=0.5, standardize=True, tasks=1.0, size=1.0, position=2.0, seg_size=0.5, rerank=7,
                          rerank_size=3.0, rerank_position=1.0)
    blocks = block_slices(cfg, 8, DEFAULT_SCHEMA)
    n_classes = sum(t.n_classes for t in DEFAULT_SCHEMA.tasks)
    assert [(k, s.stop - s.start) for k, s in blocks.items()] == [
        ("roipool", 8), ("tasks", n_classes), ("size", 1), ("position", 3), ("seg_size", 1)]
    assert vector_size(cfg, 8, DEFAULT_SCHEMA) == 8 + n_classes + 5
    rng = np.random.default_rng(0)
    parts = {"roipool": rng.normal(size=(3, 8)), "task_logits": rng.normal(size=(3, n_classes)),
             "box_log_volume": rng.normal(size=3), "position": rng.normal(size=(3, 3)),
             "seg_log_volume": rng.normal(size=3)}
    stats = {k: {"mean": np.zeros(np.shape(v)[1:]).tolist(), "sd": np.ones(np.shape(v)[1:]).tolist()}
             for k, v in parts.items() if k != "task_logits"}
    x = compose(parts, cfg, DEFAULT_SCHEMA, stats)
    assert x.shape[1] == vector_size(cfg, 8, DEFAULT_SCHEMA)
    # the size column is the z-scored log volume x weight / sqrt(2): where block_slices says it is
    assert np.allclose(x[:, blocks["size"]][:, 0], parts["box_log_volume"] / np.sqrt(2), atol=1e-6)
    scales = rerank_scales(cfg, 8, DEFAULT_SCHEMA)
    assert scales[blocks["size"]].tolist() == [3.0] and scales[blocks["position"]].tolist() == [0.5] * 3
    assert (np.delete(scales, np.r_[blocks["size"], blocks["position"]]) == 1).all()
    # the second stage's distance is the distance of the recipe with those weights
    again = compose(parts, RetrievalConfig(**{**cfg.__dict__, "size": 3.0, "position": 1.0}), DEFAULT_SCHEMA, stats)
    assert np.allclose(x * scales, again, atol=1e-5)
    assert rerank_scales(RetrievalConfig(size=1.0), 8, DEFAULT_SCHEMA) is None  # rerank 0: one stage
    meta = {"model_config": {"channels": 8}, "tasks": DEFAULT_SCHEMA.to_dict()}
    assert recipe_rerank(cfg, meta, x.shape[1], "emb")[0] == 7
    with pytest.raises(InputError, match="emb: vectors of 9 numbers, but the recipe composes"):
        recipe_rerank(cfg, meta, 9, "emb")


@pytest.mark.parametrize("kw, match", [
    ({"rerank": -1}, "retrieval.rerank: expected a whole number >= 0"),
    ({"rerank": True}, "retrieval.rerank: expected a whole number >= 0"),
    ({"rerank": 5, "rerank_size": 2.0}, r"retrieval.rerank_size: the vector has no size part .*retrieval.size is 0"),
    ({"rerank": 5, "size": 1.0, "rerank_size": -1.0}, "retrieval.rerank_size: expected a weight >= 0"),
    ({"rerank": 5, "position": 1.0, "rerank_position": "x"}, "retrieval.rerank_position: expected a weight"),
])
def test_rerank_settings_are_checked(kw, match):
    with pytest.raises(InputError, match=match):
        RetrievalConfig(**kw)


def test_search_ranks_as_the_evaluation_does_and_the_fingerprint_ignores_the_second_stage():
    from embedder.embed import settings_fingerprint
    from retrieval.search import Archive, rank
    from tumornet.detect import DetectConfig

    rng = np.random.default_rng(1)
    x = rng.normal(size=(40, 4)).astype(np.float32)
    patients = np.array([f"p{i // 2}" for i in range(40)])  # two tumors a patient
    table = pa.Table.from_pylist([{"scan_key": f"s{i}", "patient_key": patients[i], "tumor_id": 1, "size_mm": 10.0,
                                   **{f"label_{t}": 0 for t in DEFAULT_SCHEMA.names}} for i in range(40)])
    scales = np.array([1.0, 1.0, 1.0, 4.0])
    model = SimpleNamespace(schema=DEFAULT_SCHEMA)
    archive = Archive(table, lambda q, n: _brute(x, q, n), lambda i: x[i], rerank=(8, scales))
    db = Split(x=x, labels={}, size_mm=np.full(40, 10.0), patients=patients)
    for i in (0, 7, 31):
        (res,) = rank(model, archive, [{"tumor_id": 1, "embedding": x[i], "patient_key": patients[i]}], k=5)
        q = Split(x=x[i:i + 1], labels={}, size_mm=np.array([10.0]), patients=patients[i:i + 1])
        want = neighbours(db, q, 5, rerank=(8, scales))[0]
        assert [h["scan_key"] for h in res["hits"]] == [f"s{j}" for j in want]
        assert [h["rank"] for h in res["hits"]] == [1, 2, 3, 4, 5]
        d2 = [h["rerank_distance"] for h in res["hits"]]
        assert d2 == sorted(d2) and all(h["patient_key"] != patients[i] for h in res["hits"])
        assert res["hits"][0]["distance"] == pytest.approx(float(np.linalg.norm(x[want[0]] - x[i])), rel=1e-5)
    one = Archive(table, lambda q, n: _brute(x, q, n), lambda i: x[i])
    (plain,) = rank(model, one, [{"tumor_id": 1, "embedding": x[0], "patient_key": None}], k=3)
    assert [h["scan_key"] for h in plain["hits"]] == ["s0", *[f"s{j}" for j in _brute(x, x[:1], 3)[1][0][1:]]]
    assert "rerank_distance" not in plain["hits"][0]
    # the second stage changes no stored vector: an archive embedded before stays valid
    site = dict(roipool=0.5, standardize=True, tasks=1.0, size=1.0, position=1.0)
    fp = [settings_fingerprint(2.0, 64, (RetrievalConfig(**site, **extra), None), DetectConfig())
          for extra in ({}, {"rerank": 7, "rerank_size": 2.0, "rerank_position": 2.0})]
    assert fp[0] == fp[1]


def _brute(x, q, n):
    d = ((np.atleast_2d(q)[:, None] - x[None]) ** 2).sum(-1)
    idx = np.argsort(d, 1, kind="stable")[:, :n]
    return np.sqrt(np.take_along_axis(d, idx, 1)), idx
