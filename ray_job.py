"""Command line: argument parsing -> one function call per subcommand.

This is what `ray job submit ... -- python ray_job.py <subcommand>` runs, and the
`tumor-retrieval` console script. Ray is imported only by the subcommands that need it.
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import sys
import time
from dataclasses import replace
from pathlib import Path

from tumornet.errors import InputError
from tumornet.keys import check_key


def _config(args):
    from tumornet.config import load_config

    return load_config(args.config, args.set)


def cmd_phantom(args) -> None:
    from tumornet.synth.phantom import generate_cohort

    cfg = _config(args).phantom
    updates = {k: v for k, v in (("patients", args.patients), ("seed", args.seed),
                                 ("voxel_mm", args.spacing), ("workers", args.workers)) if v is not None}
    manifest = generate_cohort(replace(cfg, **updates), args.out)
    print(f"wrote {manifest}")


def cmd_import(args) -> None:
    from tumornet.layouts import import_layout

    import_layout(args.root, args.layout, manifest_name=args.name,
                  **({} if args.warp_mm is None else {"warp_mm": args.warp_mm}))


def cmd_summary(args) -> None:
    from tumornet.io import atomic_write_text
    from tumornet.manifest import read_manifest
    from tumornet.summary import format_summary, summarize

    cfg = _config(args)
    cohort = read_manifest(args.manifest, cfg.tasks)
    s = summarize(cohort, test_fraction=cfg.data.test_fraction, seed=cfg.data.split_seed, measure=not args.fast)
    print(json.dumps(s, indent=2) if args.json else format_summary(s))
    if args.out:
        atomic_write_text(args.out, json.dumps(s, indent=2))


def _manifest(cfg, given: str | None) -> str:
    manifest = given or cfg.data.manifest
    if not manifest:
        raise InputError("no manifest: pass --manifest or set data.manifest in the config")
    return manifest


def _number_list(text: str, flag: str, kind=int) -> list:  # comma-separated ints (or floats)
    try:
        return [kind(v) for v in text.split(",")]
    except ValueError:
        what = "integers" if kind is int else "numbers"
        raise InputError(f"{flag}: expected comma-separated {what}, got {text!r}") from None


def cmd_train(args) -> None:
    from trainer.launch import run_training

    cfg = _config(args)
    summary = run_training(cfg, manifest=_manifest(cfg, args.manifest), run_name=args.name, fresh=args.fresh)
    print(json.dumps({k: summary[k] for k in ("run", "run_dir", "checkpoint", "model")}, indent=2, default=str))


def cmd_experiment(args) -> None:
    from retrieval.experiments import format_experiment, read_variants, run_experiment, width_variants

    cfg = _config(args)
    if args.kind == "widths":
        variants, title = width_variants(_number_list(args.channels, "--channels")), "Channel width (paper Tab. 2)"
    elif args.kind == "ablation":
        variants, title = read_variants(args.variants or "ablation"), "Task ablation (paper Tab. 3)"
    else:
        variants, title = read_variants(args.variants or "recipes"), "Retrieval recipe"
    exp = run_experiment(title, cfg, variants, manifest=_manifest(cfg, args.manifest), secret_file=args.secret_file,
                         out_dir=args.out, k=args.k)
    print(format_experiment(exp))


def cmd_recipe_grid(args) -> None:
    from retrieval.evaluate import plain
    from retrieval.experiments import GRID, format_grid, read_grid, recipe_grid
    from tumornet.io import atomic_write_text
    from tumornet.keys import read_secret

    rows = recipe_grid(args.model, args.embeddings, args.manifest, read_secret(args.secret_file), k=args.k,
                       draws=args.draws, grid=read_grid(args.grid) if args.grid else GRID)
    print(format_grid(rows, top=args.top))
    if args.out:
        atomic_write_text(args.out, json.dumps(plain(rows), indent=2))


def cmd_recipe_mean(args) -> None:
    from retrieval.evaluate import plain
    from retrieval.experiments import combine_grids, format_combined
    from tumornet.io import atomic_write_text

    names, rows = combine_grids(args.grids)
    print(format_combined(names, rows, top=args.top))
    if args.out:
        atomic_write_text(args.out, json.dumps(plain({"trainings": names, "rows": rows}), indent=2))


def cmd_report(args) -> None:
    from retrieval.evaluate import evaluate, read_evaluation
    from retrieval.experiments import read_experiment
    from retrieval.report import build_report
    from tumornet.keys import read_secret

    secret = read_secret(args.secret_file)
    if args.evaluation:
        evaluation = read_evaluation(args.evaluation)
    else:
        evaluation = evaluate(args.embeddings, args.manifest, secret, args.model)
    summary = json.loads(Path(args.summary).read_text()) if args.summary else None
    path = build_report(model=args.model, embeddings=args.embeddings, manifest=args.manifest, secret=secret,
                        out_dir=args.out, evaluation=evaluation, summary=summary,
                        experiments=[read_experiment(e) for e in args.experiment])
    print(f"report: {path} (and {path.with_name('results.json')})")


def cmd_embed(args) -> None:
    from embedder.job import failure_message, run_embedding

    e = _config(args).embed  # the config's section `embed`, then the options given
    e = replace(e, **{k: v for k in vars(e) if (v := getattr(args, k)) is not None})
    report = run_embedding(manifest=args.manifest, model_path=args.model, out_dir=args.out,
                           secret_file=args.secret_file, spacing_mm=args.spacing, patch_size=args.patch,
                           min_volume_ml=args.min_volume_ml, **vars(e))
    if not report["ok"]:
        print(f"error: {failure_message(report)}", file=sys.stderr)
    return 0 if report["ok"] else 1


def cmd_index(args) -> None:
    from retrieval.index import build_index

    print(json.dumps(build_index(args.embeddings, model_id=args.model_id, exact_below=args.exact_below,
                                 nprobe=args.nprobe), indent=2))


def cmd_retune(args) -> None:
    if args.manifest:  # any retrieval key: the recipe's statistics and refit heads fit again
        from embedder.embed import model_fingerprint
        from trainer.loop import with_recipe

        before = model_fingerprint(args.model)
        mid = with_recipe(args.model, args.out, args.set, args.manifest)
        same = model_fingerprint(args.out) == before
        print(f"wrote {args.out}: model {mid} with {', '.join(args.set)}, its statistics fit again on the training "
              "scans " + ("(the same vectors: its archives stay valid)" if same else
                          "(embed the archive again: its vectors change)"))
        return
    from tumornet.export import with_search_settings

    mid = with_search_settings(args.model, args.out, args.set)
    print(f"wrote {args.out}: model {mid} with {', '.join(args.set)}")


def cmd_compact(args) -> None:
    from embedder.shards import compact_shards

    print(json.dumps(compact_shards(args.embeddings, rows_per_file=args.rows_per_file), indent=2))


def cmd_forget(args) -> None:
    from embedder.forget import forget, keys_of_patients_file
    from retrieval.index import refresh_indexes

    patients = list(args.patient_key)
    if args.patients_file:
        patients += keys_of_patients_file(args.patients_file, args.secret_file)
    report = forget(args.embeddings, patient_keys=patients, scan_keys=args.scan_key)
    report["indexes"] = refresh_indexes(args.embeddings, report["models"])
    print(json.dumps(report, indent=2))


def cmd_evaluate(args) -> None:
    from retrieval.evaluate import evaluate, format_evaluation, write_evaluation
    from tumornet.keys import read_secret

    if args.detector and not args.detection:
        raise InputError("evaluate: --detector scores the tumors a detector finds: give --detection with it")
    ts = _number_list(args.detect_thresholds, "--detect-thresholds", float) if args.detect_thresholds else None
    if ts and not all(0 < t < 1 for t in ts):
        raise InputError(f"--detect-thresholds: each must be in (0, 1), got {args.detect_thresholds!r}")
    secret = read_secret(args.secret_file)
    retrieval = None
    if args.recompose:  # the model file's own recipe, from the stored parts (a retuned model on its base's shards)
        from tumornet.descriptor import recipe_of
        from tumornet.export import load_model

        retrieval = recipe_of(load_model(args.model)[1])[0]
    res = evaluate(args.embeddings, args.manifest, secret, args.model, k=args.k, ks=_number_list(args.ks, "--ks"),
                   on=args.on, rerank=args.rerank, retrieval=retrieval,
                   oracle_mm=_number_list(args.oracle_frontier, "--oracle-frontier", float) if args.oracle_frontier
                   else ())
    print(format_evaluation(res))
    if args.detection:
        from retrieval.detection import detection_sweep, format_detection, parse_windows

        rows = detection_sweep(args.model, args.manifest, on=args.on, thresholds=ts,  # the model's own first
                               windows=parse_windows(args.detect_windows) if args.detect_windows else None,
                               detector=args.detector)
        res["detection"], res["detection_sweep"] = rows[0], rows
        print("\n".join(format_detection(r) for r in rows))
    if args.robustness:
        from retrieval.robustness import format_robustness, robustness

        res["robustness"] = robustness(args.model, args.embeddings, args.manifest, secret, k=args.k,
                                       draws=args.draws, seed=args.seed, on=args.on, rerank=args.rerank,
                                       retrieval=retrieval)
        print()
        print(format_robustness(res["robustness"]))
    write_evaluation(res, args.out or Path(args.embeddings) / "evaluation.json")


def _floats(text: str, flag: str, n: int) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) != n:
        raise InputError(f"{flag}: expected {n} comma-separated numbers, got {text!r}")
    return values


def cmd_search(args) -> None:
    from retrieval.search import format_search, query_rows, search, search_archived, search_box

    if len([f for f in ("mask", "box", "tumor") if getattr(args, f)]) > 1 or bool(args.tumor) == bool(args.image):
        raise InputError("search: give --image (alone, with --mask or with --box), or --tumor SCAN_KEY:TUMOR_ID")
    if args.scan_tumors is not None and not args.box:
        raise InputError("search: --scan-tumors is for a query by --box (a mask, or the archive, knows how "
                         "many tumors its scan holds)")
    if args.detector and (args.mask or args.box or args.tumor):
        raise InputError("search: --detector finds the tumors of --image alone (a mask, a box or an archived "
                         "tumor needs no detection)")
    if args.tumor and args.patient_key:
        raise InputError("search: --patient-key is for a new scan's query; --tumor knows its own patient")
    if args.patient_key is not None:
        check_key(args.patient_key, "--patient-key")
    if args.tumor:
        results = search_archived(args.model, args.embeddings, args.tumor, k=args.k, where=args.where,
                                  rerank=args.rerank)
    elif args.box:
        results = search_box(args.model, args.embeddings, args.image, _floats(args.box, "--box", 6), k=args.k,
                             where=args.where, rerank=args.rerank, patient_key=args.patient_key,
                             scan_tumors=args.scan_tumors)
    else:
        tumor_ids = _number_list(args.tumor_id, "--tumor-id") if args.tumor_id else None
        rows = query_rows(args.image, args.mask, binary=args.binary, tumor_ids=tumor_ids)
        results = search(args.model, args.embeddings, rows, k=args.k, where=args.where, rerank=args.rerank,
                         patient_key=args.patient_key, detector=args.detector)
    print(json.dumps(results, indent=2) if args.json else format_search(results))


def cmd_demo(args) -> None:
    """The pipeline on the synthetic cohort, composed of the subcommands a user runs."""
    import shutil

    from retrieval.search import drawn_box_example, held_out_example
    from tumornet.export import load_model
    from tumornet.keys import ensure_secret, patient_key, read_secret

    cfg = _config(args)
    out = Path(args.out).resolve()
    manifest, runs, emb = out / "cohort" / "manifest.csv", out / "runs", out / "embeddings"
    model = runs / cfg.name / "model.pt"
    key = ensure_secret(out / "site.key")  # the demo's key; a real site keeps its own, outside the outputs
    shutil.rmtree(emb, ignore_errors=True)  # the demo always starts from scratch
    common = ["--config", args.config, *[a for s in args.set for a in ("--set", s)]]
    d = cfg.distributed
    example = functools.cache(lambda: held_out_example(manifest, model))  # the searches' query scan (after training)
    steps = [
        (f"synthetic cohort: {cfg.phantom.patients} patients at {cfg.phantom.voxel_mm} mm",
         lambda: ["phantom", *common, "--out", str(manifest.parent)]),
        ("cohort summary", lambda: ["summary", *common, str(manifest), "--out", str(out / "summary.json")]),
        (f"training: Ray Train + DeepSpeed, {d.workers} CPU workers, {cfg.train.epochs} epochs x "
         f"{cfg.train.batches_per_epoch} batches x {cfg.train.batch_size}, {cfg.train.patch_size}^3 patches, "
         f"C = {cfg.model.channels}",
         lambda: ["train", *common, "--manifest", str(manifest), "--fresh", "--set",
                  f"distributed.storage_path={runs}"]),
        ("archive embedding: Ray Data -> Parquet shards (the whole synthetic archive)",
         lambda: ["embed", "--model", str(model), "--manifest", str(manifest), "--out", str(emb), "--secret-file",
                  str(key), "--workers", str(d.workers), "--threads", str(d.cpus_per_worker)]),
        ("search: a held-out scan as the query, its 5 nearest tumors of other patients",
         lambda: ["search", "--model", str(model), "--embeddings", str(emb),
                  "--image", str(example().image), "--mask", str(example().mask),
                  "--patient-key", patient_key(example().patient_id, read_secret(key))]),
        ("search by box, the paper's query: a box drawn 20 % too large around that scan's first tumor",
         lambda: ["search", "--model", str(model), "--embeddings", str(emb), "--image", str(example().image),
                  "--box", ",".join(f"{v:.1f}" for v in drawn_box_example(
                      example(), load_model(model)[1]["extra"]["spacing_mm"])),
                  "--patient-key", patient_key(example().patient_id, read_secret(key))]),
        ("evaluation: the K nearest training tumors of each held-out tumor, learned vs handcrafted vs none; "
         "boxes distorted; tumors found without masks",
         lambda: ["evaluate", "--embeddings", str(emb), "--manifest", str(manifest), "--secret-file", str(key),
                  "--model", str(model), "--robustness", "--detection", "--out", str(out / "evaluation.json")]),
        ("report: HTML with the K curve, tables, t-SNE, retrieval examples, training curves, provenance",
         lambda: ["report", "--model", str(model), "--embeddings", str(emb), "--manifest", str(manifest),
                  "--secret-file", str(key), "--evaluation", str(out / "evaluation.json"), "--summary",
                  str(out / "summary.json"), "--out", str(out / "report")]),
    ]
    t0 = time.perf_counter()
    for i, (title, argv) in enumerate(steps, start=1):
        print(f"[{i}/{len(steps)}] {title}", flush=True)
        run(argv())
    print(f"demo done in {time.perf_counter() - t0:.0f} s; outputs under {out}")


def archive_args(sp, *, model_help="model.pt the shards were embedded with (it records its split)"):
    """The inputs of every command that scores or reports a model's archive."""
    sp.add_argument("--model", required=True, help=model_help)
    sp.add_argument("--embeddings", required=True, help="folder of embedding shards")
    sp.add_argument("--manifest", required=True, help="the manifest the model was trained on")
    sp.add_argument("--secret-file", required=True, help="the site key the shards were written with")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ray_job.py", description="Brain tumor image retrieval via multitask learning")
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(sp, default="demo"):
        sp.add_argument("--config", default=default,
                        help="YAML config: a path, or a bundled config by name (demo, paper; default: %(default)s)")
        sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set phantom.patients=40 (repeatable)")
        return sp

    sp = with_config(sub.add_parser("phantom", help="generate the synthetic labeled cohort on real anatomy"))
    sp.add_argument("--out", required=True, help="output folder (images/, masks/, manifest.csv)")
    sp.add_argument("--patients", type=int)
    sp.add_argument("--seed", type=int)
    sp.add_argument("--spacing", type=float, help="voxel size in mm (isotropic)")
    sp.add_argument("--workers", type=int, help="processes")
    sp.set_defaults(func=cmd_phantom)

    sp = sub.add_parser("import", help="write a manifest for a public dataset layout")
    sp.add_argument("layout", choices=["brats-met", "brats-men", "vs-seg"])
    sp.add_argument("root", help="dataset folder holding the case folders")
    sp.add_argument("--name", default="manifest.csv", help="manifest file name inside root")
    sp.add_argument("--warp-mm", type=float, help="the registration behind the location labels bends on control "
                    "points this far apart (mm; default tumornet.layouts.IMPORT_WARP_MM, 24; 0: affine only)")
    sp.set_defaults(func=cmd_import)

    sp = with_config(sub.add_parser("summary", help="validate a manifest and summarize the cohort"))
    sp.add_argument("manifest")
    sp.add_argument("--json", action="store_true")
    sp.add_argument("--fast", action="store_true", help="skip measuring tumor sizes from the masks")
    sp.add_argument("--out", help="also write the summary as JSON to this file")
    sp.set_defaults(func=cmd_summary)

    sp = with_config(sub.add_parser("train", help="Ray Train + DeepSpeed training (local or on the job's cluster)"))
    sp.add_argument("--manifest", help="cohort manifest (default: data.manifest of the config)")
    sp.add_argument("--name", help="run name (default: the config's name); the same name resumes")
    sp.add_argument("--fresh", action="store_true", help="delete the run of that name first (start from scratch)")
    sp.set_defaults(func=cmd_train)

    sp = with_config(sub.add_parser("experiment", help="train, embed, score: widths (Tab. 2), ablation (Tab. 3)"))
    sp.add_argument("kind", choices=["widths", "ablation", "recipes"])
    sp.add_argument("--channels", default="16,32,64,96", help="widths: the feature-map widths C")
    sp.add_argument("--variants", help="ablation / recipes: YAML of variants (default: the bundled ablation / recipes)")
    sp.add_argument("--manifest", help="cohort manifest (default: data.manifest of the config)")
    sp.add_argument("--secret-file", required=True, help="the site key for the embedding shards' keyed ids")
    sp.add_argument("--out", required=True, help="folder of the runs, embeddings and the table (<kind>.json / .md)")
    sp.add_argument("--k", type=int, default=5)
    sp.set_defaults(func=cmd_experiment)

    sp = sub.add_parser("recipe-grid", help="score a grid of retrieval recipes on a model's validation split")
    archive_args(sp, model_help="model.pt trained with data.validation_fraction > 0")
    sp.add_argument("--k", type=int, default=5)
    sp.add_argument("--top", type=int, default=10, help="rows printed (all are written with --out)")
    sp.add_argument("--draws", type=int, default=0, help="also score distorted boxes, this many draws (eq. 2)")
    sp.add_argument("--grid", help="YAML: retrieval key -> values to try (default: the third round's grid)")
    sp.add_argument("--out", help="JSON of every recipe's scores")
    sp.set_defaults(func=cmd_recipe_grid)

    sp = sub.add_parser("recipe-mean", help="the mean score of every recipe over several trainings' recipe grids")
    sp.add_argument("--grids", nargs="+", required=True, help="recipe-grid --out JSONs, one per training")
    sp.add_argument("--top", type=int, default=10)
    sp.add_argument("--out", help="JSON of every recipe's mean and per-training scores")
    sp.set_defaults(func=cmd_recipe_mean)

    sp = sub.add_parser("report", help="the HTML report (figures embedded) and results.json of a model")
    archive_args(sp, model_help="model.pt (its metrics.jsonl beside it gives the training curves)")
    sp.add_argument("--out", required=True, help="folder for report.html and results.json")
    sp.add_argument("--evaluation", help="evaluation.json from `evaluate --out` (default: evaluate now, no robustness)")
    sp.add_argument("--experiment", action="append", default=[], help="an experiment's table JSON (repeatable)")
    sp.add_argument("--summary", help="the cohort summary JSON (`summary --out`) for the provenance")
    sp.set_defaults(func=cmd_report)

    sp = with_config(sub.add_parser("embed", help="Ray Data: embed every tumor of an archive into Parquet shards"))
    sp.add_argument("--model", required=True, help="model.pt exported by training")
    sp.add_argument("--manifest", required=True, help="the archive's manifest (CSV / Parquet), or a folder of NIfTI "
                    "files (scans without masks: the model finds the tumors)")
    sp.add_argument("--min-volume-ml", type=float, help="smallest tumor found in a scan without mask (config detect)")
    sp.add_argument("--detector", help="a model file whose segmentation head finds the tumors of scans without a "
                    "mask, at its own detect settings (config embed.detector; default: the model's own head)")
    sp.add_argument("--out", required=True, help="folder of the embedding shards (re-runs add to it)")
    sp.add_argument("--secret-file", required=True, help="the site's key for patient_key hashes (>= 16 bytes)")
    sp.add_argument("--workers", type=int, help="Ray Data actors, each loads the model once (config embed: 2)")
    sp.add_argument("--threads", type=int, dest="threads_per_worker", help="CPUs (torch threads) per actor (1)")
    sp.add_argument("--gpus-per-worker", type=float, help="GPUs per actor (0: CPU); reads stay on CPU")
    sp.add_argument("--precision", choices=["fp32", "bf16", "fp16"], help="autocast on GPU (fp32)")
    sp.add_argument("--scans-per-shard", type=int, help="scans per shard file (8)")
    sp.add_argument("--spacing", type=float, help="working voxel size in mm (default: the model's training spacing)")
    sp.add_argument("--patch", type=int, help="patch size in voxels (default: the model's training patch size)")
    sp.add_argument("--max-failure-rate", type=float, help="exit 1 above this share of failed or skipped scans (0.05)")
    sp.set_defaults(func=cmd_embed)

    sp = sub.add_parser("index", help="build or update the FAISS index beside the shards (search then uses it)")
    sp.add_argument("--embeddings", required=True, help="folder of embedding shards")
    sp.add_argument("--model-id", help="which model's rows (needed when the shards hold several)")
    sp.add_argument("--exact-below", type=int, default=100_000, help="exact index up to this many vectors, IVF above")
    sp.add_argument("--nprobe", type=int, default=32, help="IVF lists searched per query")
    sp.set_defaults(func=cmd_index)

    sp = sub.add_parser("retune", help="a copy of a model file with its retrieval recipe changed (no training)")
    sp.add_argument("--model", required=True)
    sp.add_argument("--out", required=True, help="the new model file (the same model id)")
    sp.add_argument("--set", action="append", default=[], help="retrieval.KEY=VALUE: rerank, rerank_size, "
                    "rerank_position, refine_box, drawn_size or drawn_read; any retrieval key with --manifest")
    sp.add_argument("--manifest", help="the training cohort: the recipe's statistics and refit heads are fit "
                    "again on the model's training scans, so any retrieval key may change")
    sp.set_defaults(func=cmd_retune)

    sp = sub.add_parser("compact", help="rewrite embedding shards into few large files (newest rows only)")
    sp.add_argument("--embeddings", required=True, help="folder of embedding shards")
    sp.add_argument("--rows-per-file", type=int, default=200_000)
    sp.set_defaults(func=cmd_compact)

    sp = sub.add_parser("forget", help="remove patients or scans from an archive (rows, files and index), for good")
    sp.add_argument("--embeddings", required=True, help="folder of embedding shards")
    sp.add_argument("--patient-key", action="append", default=[], help="a patient's keyed id (repeatable)")
    sp.add_argument("--scan-key", action="append", default=[], help="a scan's keyed id (repeatable)")
    sp.add_argument("--patients-file", help="raw patient ids, one a line, keyed with --secret-file")
    sp.add_argument("--secret-file", help="the site key the shards were written with (for --patients-file)")
    sp.set_defaults(func=cmd_forget)

    sp = sub.add_parser("evaluate", help="KNN retrieval scores of the model's held-out split: learned vs handcrafted")
    archive_args(sp)
    sp.add_argument("--k", type=int, default=5, help="neighbours (the paper's 5)")
    sp.add_argument("--ks", default=",".join(str(q) for q in range(1, 21)), help="the K curve (default 1..20)")
    sp.add_argument("--out", help="JSON result (default: <embeddings>/evaluation.json)")
    sp.add_argument("--on", default="test", choices=["test", "validation"],
                    help="the queries: the held-out test patients, or the validation patients (to choose a recipe on)")
    sp.add_argument("--robustness", action="store_true", help="also score held-out tumors with distorted boxes (eq. 2)")
    sp.add_argument("--oracle-frontier", help="also the oracle with a label worth these mm of size (e.g. 2,5,10)")
    sp.add_argument("--detection", action="store_true", help="also score the tumors found without masks (recall)")
    sp.add_argument("--detect-thresholds", help="--detection at these thresholds too (e.g. 0.2,0.3,0.5)")
    sp.add_argument("--detect-windows", help="--detection with these sliding windows too, WINDOW:OVERLAP (e.g. 64:0.5)")
    sp.add_argument("--detector", help="--detection of the tumors a detector model finds (embed --detector; it must "
                    "record the model's split)")
    sp.add_argument("--draws", type=int, default=3, help="distortions of every held-out tumor (for --robustness)")
    sp.add_argument("--seed", type=int, default=0, help="seed of the distortions (for --robustness)")
    sp.add_argument("--rerank", type=int, help="search with this many first-stage candidates instead of the "
                    "recipe's retrieval.rerank (0: one stage; the stored vectors are the same)")
    sp.add_argument("--recompose", action="store_true", help="score the model file's own recipe, its vectors "
                    "recomposed from the shards' stored parts (a model from `retune --manifest`, scored on the "
                    "archive its base model embedded: the same weights)")
    sp.set_defaults(func=cmd_evaluate)

    sp = sub.add_parser("search", help="the archive tumors most similar to a new scan's tumors")
    sp.add_argument("--model", required=True, help="model.pt the archive was embedded with")
    sp.add_argument("--embeddings", required=True, help="folder of embedding shards")
    sp.add_argument("--image", help="the new scan: T1 with contrast, NIfTI (alone: the model finds the tumors)")
    sp.add_argument("--mask", help="its tumor mask: an instance mask (value = tumor), or --binary")
    sp.add_argument("--box", help="a box around the tumor instead of a mask: x0,y0,z0,x1,y1,z1 in mm (RAS world)")
    sp.add_argument("--scan-tumors", type=int, help="with --box: how many tumors the scan holds, where the model's "
                    "recipe reads it (retrieval.scan_count; default: counted by the segmentation head)")
    sp.add_argument("--tumor", help="an archived tumor as the query: SCAN_KEY:TUMOR_ID (its own patient excluded)")
    sp.add_argument("--where", action="append", default=[], help="only archive tumors with this label, task=class, "
                    "or this case information, info_COLUMN=value (* for any)")
    sp.add_argument("--patient-key", help="the new scan's patient as the shards key it (patient_key): that "
                    "patient's archived tumors are left out")
    sp.add_argument("--binary", action="store_true", help="the mask is binary: each connected component is a tumor")
    sp.add_argument("--tumor-id", help="only these tumors of the mask (comma-separated)")
    sp.add_argument("--detector", help="--image alone: a model file whose segmentation head finds the tumors "
                    "(as embed --detector; default: the model's own head)")
    sp.add_argument("--k", type=int, default=5)
    sp.add_argument("--rerank", type=int, help="first-stage candidates instead of the recipe's retrieval.rerank "
                    "(0: one stage)")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_search)

    sp = with_config(sub.add_parser("demo", help="end to end on the synthetic cohort"))
    sp.add_argument("--out", default="outputs/demo")
    sp.set_defaults(func=cmd_demo)
    return p


# options whose value may start with "-" (a box in mm left of or behind the origin: --box -20,10,5,-2,30,22),
# which argparse would otherwise take for an option
DASH_VALUES = ("--box",)


def parse(argv: list[str] | None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    out = []
    while argv:
        a = argv.pop(0)
        negative = a in DASH_VALUES and argv and re.match(r"-[\d.]", argv[0])  # not the next option
        out.append(f"{a}={argv.pop(0)}" if negative else a)
    return build_parser().parse_args(out)


def run(argv: list[str]) -> None:
    """Run one subcommand in this process (what the demo composes); InputError propagates, and a
    non-zero exit status of the subcommand stops the caller too."""
    args = parse(argv)
    status = args.func(args) or 0
    if status:
        raise SystemExit(status)


def main(argv=None) -> int:
    """Exit status: 0 done; 1 a batch job failed above its tolerance (embed); 2 bad input."""
    args = parse(argv)
    try:
        return args.func(args) or 0
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
