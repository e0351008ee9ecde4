"""Command line: argument parsing -> one function call per subcommand.

This is what `ray job submit ... -- python ray_job.py <subcommand>` runs, and the
`tumor-retrieval` console script. Ray is imported only by the subcommands that need it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

from tumornet.errors import InputError


def cmd_phantom(args) -> None:
    from tumornet.config import load_config
    from tumornet.phantom import generate_cohort

    cfg = load_config(args.config, args.set).phantom
    updates = {k: v for k, v in (("patients", args.patients), ("seed", args.seed),
                                 ("spacing_mm", args.spacing), ("workers", args.workers)) if v is not None}
    cfg = replace(cfg, **updates)
    manifest = generate_cohort(cfg, args.out)
    print(f"wrote {manifest}")


def cmd_import(args) -> None:
    from tumornet.layouts import import_layout

    import_layout(args.root, args.layout, manifest_name=args.name)


def cmd_summary(args) -> None:
    from tumornet.cohort import read_manifest
    from tumornet.config import load_config
    from tumornet.summary import format_summary, summarize

    cfg = load_config(args.config, args.set)
    cohort = read_manifest(args.manifest, cfg.tasks)
    s = summarize(cohort, test_fraction=cfg.data.test_fraction, seed=cfg.data.split_seed, measure=not args.fast)
    print(json.dumps(s, indent=2) if args.json else format_summary(s))


def _manifest(cfg, given: str | None) -> str:
    manifest = given or cfg.data.manifest
    if not manifest:
        raise InputError("no manifest: pass --manifest or set data.manifest in the config")
    return manifest


def _int_list(text: str, flag: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise InputError(f"{flag}: expected comma-separated integers, got {text!r}") from None


def cmd_train(args) -> None:
    from trainer.launch import run_training
    from tumornet.config import load_config

    cfg = load_config(args.config, args.set)
    summary = run_training(cfg, manifest=_manifest(cfg, args.manifest), run_name=args.name)
    print(json.dumps({k: summary[k] for k in ("run", "run_dir", "checkpoint", "model")}, indent=2, default=str))


def cmd_sweep(args) -> None:
    from trainer.launch import format_sweep, run_sweep
    from tumornet.config import load_config

    cfg = load_config(args.config, args.set)
    channels = _int_list(args.channels, "--channels")
    print(format_sweep(run_sweep(cfg, manifest=_manifest(cfg, args.manifest), channels=channels)))


def cmd_embed(args) -> None:
    from embedder.job import run_embedding

    report = run_embedding(manifest=args.manifest, model_path=args.model, out_dir=args.out,
                           secret_file=args.secret_file, workers=args.workers, threads_per_worker=args.threads,
                           scans_per_shard=args.scans_per_shard, spacing_mm=args.spacing, patch_size=args.patch)
    print(json.dumps(report, indent=2))


def cmd_evaluate(args) -> None:
    from embedder.job import read_secret
    from retrieval.evaluate import evaluate, format_evaluation, write_evaluation
    from tumornet.config import load_config

    cfg = load_config(args.config, args.set)
    ks = _int_list(args.ks, "--ks")
    if args.k < 1 or min(ks) < 1:
        raise InputError("--k and --ks: K must be >= 1")
    if args.robustness and not args.model:
        raise InputError("--robustness needs --model (the held-out tumors are embedded again with distorted boxes)")
    if args.draws < 1:
        raise InputError(f"--draws: expected >= 1, got {args.draws}")
    res = evaluate(args.embeddings, args.manifest, read_secret(args.secret_file), cfg, k=args.k, ks=ks,
                   model_id=args.model_id)
    print(format_evaluation(res))
    if args.robustness:
        from retrieval.robustness import format_robustness, robustness

        res["robustness"] = robustness(args.model, args.embeddings, args.manifest, read_secret(args.secret_file), cfg,
                                       k=args.k, draws=args.draws, seed=cfg.data.split_seed)
        print()
        print(format_robustness(res["robustness"]))
    write_evaluation(res, args.out or Path(args.embeddings) / "evaluation.json")


def cmd_search(args) -> None:
    from retrieval.search import format_search, query_rows, search

    tumor_ids = _int_list(args.tumor_id, "--tumor-id") if args.tumor_id else None
    rows = query_rows(args.image, args.mask, binary=args.binary, tumor_ids=tumor_ids)
    results = search(args.model, args.embeddings, rows, k=args.k)
    print(json.dumps(results, indent=2) if args.json else format_search(results))


def _demo_secret(path: Path) -> Path:
    """The demo's site key (a real site keeps its own, outside the outputs)."""
    import secrets

    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_hex(32))
        path.chmod(0o600)
    return path


def cmd_demo(args) -> None:
    import shutil

    from embedder.job import read_secret, run_embedding
    from retrieval.evaluate import evaluate, format_evaluation, write_evaluation
    from retrieval.search import format_search, query_rows, search
    from trainer.launch import run_training
    from tumornet.cohort import read_manifest, split_scan_ids
    from tumornet.config import apply_overrides, config_from_dict, load_config
    from tumornet.phantom import generate_cohort
    from tumornet.summary import format_summary, summarize

    cfg = load_config(args.config, args.set)
    out = Path(args.out).resolve()
    t0 = time.perf_counter()
    print(f"[1/5] synthetic cohort: {cfg.phantom.patients} patients at {cfg.phantom.spacing_mm} mm -> {out / 'cohort'}")
    manifest = generate_cohort(cfg.phantom, out / "cohort")
    cohort = read_manifest(manifest, cfg.tasks)
    print("[2/5] cohort summary")
    s = summarize(cohort, test_fraction=cfg.data.test_fraction, seed=cfg.data.split_seed)
    (out / "summary.json").write_text(json.dumps(s, indent=2))
    print(format_summary(s))
    runs = out / "runs"
    shutil.rmtree(runs / cfg.name, ignore_errors=True)  # the demo always trains from scratch
    cfg = config_from_dict(apply_overrides(cfg.raw, [f"distributed.storage_path={runs}"]), source=args.config)
    d, t = cfg.distributed, cfg.train
    print(f"[3/5] training: Ray Train + DeepSpeed, {d.workers} CPU workers, {t.epochs} epochs x "
          f"{t.batches_per_epoch} batches x {t.batch_size}, {t.patch_size}^3 patches, C = {cfg.model.channels}")
    summary = run_training(cfg, manifest=manifest)
    last = json.loads((Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()[-1])
    print("final: " + ", ".join(f"{k} {v:.3f}" for k, v in last.items() if k.startswith(("val/", "train/loss"))
                                 and isinstance(v, float)))
    print(f"model: {summary['model']}")
    print("[4/5] archive embedding: Ray Data -> Parquet shards (incremental; the whole synthetic archive)")
    emb = out / "embeddings"
    shutil.rmtree(emb, ignore_errors=True)
    key = _demo_secret(out / "site.key")
    run_embedding(manifest=manifest, model_path=summary["model"], out_dir=emb, secret_file=key, workers=d.workers,
                  threads_per_worker=d.cpus_per_worker)
    print("[5/5] retrieval: a held-out scan as a query (rank 1 is that scan itself, also in the archive), then the "
          "paper's evaluation: K nearest training tumors of each held-out tumor")
    _, held_out = split_scan_ids(cohort, test_fraction=cfg.data.test_fraction, seed=cfg.data.split_seed)
    first = cohort.scans()[held_out[0]][0]
    print(format_search(search(summary["model"], emb, query_rows(first.image, first.mask), k=5)))
    res = evaluate(emb, manifest, read_secret(key), cfg)
    write_evaluation(res, out / "evaluation.json")
    print(format_evaluation(res))
    print(f"demo done in {time.perf_counter() - t0:.0f} s; outputs under {out}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ray_job.py", description="Brain tumor image retrieval via multitask learning")
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(sp, default="configs/demo.yaml"):
        sp.add_argument("--config", default=default, help="YAML config (default: %(default)s)")
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
    sp.set_defaults(func=cmd_import)

    sp = with_config(sub.add_parser("summary", help="validate a manifest and summarize the cohort"))
    sp.add_argument("manifest")
    sp.add_argument("--json", action="store_true")
    sp.add_argument("--fast", action="store_true", help="skip measuring tumor sizes from the masks")
    sp.set_defaults(func=cmd_summary)

    sp = with_config(sub.add_parser("train", help="Ray Train + DeepSpeed training (local or on the job's cluster)"))
    sp.add_argument("--manifest", help="cohort manifest (default: data.manifest of the config)")
    sp.add_argument("--name", help="run name (default: the config's name); the same name resumes")
    sp.set_defaults(func=cmd_train)

    sp = with_config(sub.add_parser("sweep", help="one training per channel width (paper Tab. 2)"))
    sp.add_argument("--channels", default="16,32,64,96")
    sp.add_argument("--manifest")
    sp.set_defaults(func=cmd_sweep)

    sp = sub.add_parser("embed", help="Ray Data: embed every tumor of an archive into Parquet shards (incremental)")
    sp.add_argument("--model", required=True, help="model.pt exported by training")
    sp.add_argument("--manifest", required=True, help="the archive's manifest (CSV / Parquet)")
    sp.add_argument("--out", required=True, help="folder of the embedding shards (re-runs add to it)")
    sp.add_argument("--secret-file", required=True, help="the site's key for patient_key hashes (>= 16 bytes)")
    sp.add_argument("--workers", type=int, default=2, help="Ray Data actors (each loads the model once)")
    sp.add_argument("--threads", type=int, default=1, help="CPUs (torch threads) per actor")
    sp.add_argument("--scans-per-shard", type=int, default=8)
    sp.add_argument("--spacing", type=float, help="working voxel size in mm (default: the model's training spacing)")
    sp.add_argument("--patch", type=int, help="patch size in voxels (default: the model's training patch size)")
    sp.set_defaults(func=cmd_embed)

    sp = with_config(sub.add_parser("evaluate", help="KNN accuracy per task and size RMSE on the held-out split"))
    sp.add_argument("--embeddings", required=True, help="folder of embedding shards")
    sp.add_argument("--manifest", required=True, help="the manifest the split is computed from")
    sp.add_argument("--secret-file", required=True, help="the site key the shards were written with")
    sp.add_argument("--k", type=int, default=5, help="neighbours (the paper's 5)")
    sp.add_argument("--ks", default="1,3,5,10,20", help="the K curve")
    sp.add_argument("--model-id", help="which model's rows (needed when shards hold several)")
    sp.add_argument("--out", help="JSON result (default: <embeddings>/evaluation.json)")
    sp.add_argument("--robustness", action="store_true", help="also score held-out tumors with distorted boxes (eq. 2)")
    sp.add_argument("--model", help="model.pt of the shards (for --robustness)")
    sp.add_argument("--draws", type=int, default=3, help="distortions of every held-out tumor (for --robustness)")
    sp.set_defaults(func=cmd_evaluate)

    sp = sub.add_parser("search", help="the archive tumors most similar to a new scan's tumors")
    sp.add_argument("--model", required=True, help="model.pt the archive was embedded with")
    sp.add_argument("--embeddings", required=True, help="folder of embedding shards")
    sp.add_argument("--image", required=True, help="the new scan: T1 with contrast, NIfTI")
    sp.add_argument("--mask", required=True, help="its tumor mask: an instance mask (value = tumor), or --binary")
    sp.add_argument("--binary", action="store_true", help="the mask is binary: each connected component is a tumor")
    sp.add_argument("--tumor-id", help="only these tumors of the mask (comma-separated)")
    sp.add_argument("--k", type=int, default=5)
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_search)

    sp = with_config(sub.add_parser("demo", help="end to end on the synthetic cohort"))
    sp.add_argument("--out", default="outputs/demo")
    sp.set_defaults(func=cmd_demo)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
