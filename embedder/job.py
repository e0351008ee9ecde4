"""The archive embedding job (Ray Data): manifest -> scans -> embedding shards, re-run nightly.

    ray_job.py embed --model runs/x/model.pt --manifest archive/manifest.csv --out embeddings/ \
        --secret-file site.key

The driver validates the manifest and the model, splits the scans into shards of
`scans_per_shard`, and a Ray Data actor pool (each actor loads the model once) embeds a shard
at a time and writes it as one Parquet file (embedder.shards). A scan whose image and mask are
unchanged since the same model embedded it is skipped, so the nightly re-run only embeds new or
changed scans. A scan that fails (unreadable file, empty mask, ...) is recorded in
`<out>/embed-errors.jsonl` with its manifest rows and the error, and the job keeps going;
`<out>/embed-report.json` sums up the run. Shards, logs and the errors file carry no patient or
scan id and no path: keyed hashes and manifest row numbers instead.
"""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path

import numpy as np

from trainer.ray_setup import init_ray
from tumornet.errors import InputError
from tumornet.export import load_model
from tumornet.keys import keyed_id, read_secret
from tumornet.manifest import ManifestRow, read_manifest
from tumornet.runtime import ALLOCATOR_ENV

from .embed import embed_scan, embed_settings, source_hash
from .shards import done_scans, model_shard_schema, write_shard


def _redact(message: str, rows: list[ManifestRow]) -> str:
    """An error message without the scan's file paths and ids (they may hold patient names)."""
    for r in rows[:1]:
        for text, name in ((r.image, "<image>"), (r.mask, "<mask>"), (r.scan_id, "<scan>"), (r.patient_id, "<pat>")):
            message = message.replace(str(text), name)
    return message


class ShardEmbedder:
    """A Ray Data actor: loads the model once, then embeds and writes one shard per call."""

    def __init__(self, *, manifest: str, model_path: str, out_dir: str, secret: bytes, done: set,
                 spacing_mm, patch_size: int, recipe, threads: int, stamp: str):
        import torch

        torch.set_num_threads(threads)
        self.model, meta = load_model(model_path)
        self.model_id = meta["model_id"]
        self.schema = model_shard_schema(self.model, recipe[0])
        self.scans = read_manifest(manifest, self.model.schema, check_files=False).scans()
        self.out, self.secret, self.done = Path(out_dir), secret, done
        self.spacing, self.patch, self.recipe, self.stamp = spacing_mm, patch_size, recipe, stamp

    def __call__(self, batch: dict) -> dict:
        status = {"shard": [], "scan_id": [], "status": [], "tumors": [], "error": []}
        for shard, scan_ids in zip(batch["shard"], batch["scan_ids"], strict=True):
            rows_out = []
            for scan_id in scan_ids:
                rows = list(self.scans[scan_id])
                state, n, err = "embedded", 0, ""
                try:
                    h = source_hash(rows)
                    if (keyed_id(scan_id, self.secret), h) in self.done:
                        state = "unchanged"
                    else:
                        new = embed_scan(self.model, self.model_id, rows, spacing_mm=self.spacing,
                                         patch_size=self.patch, secret=self.secret, file_hash=h,
                                         recipe=self.recipe)
                        rows_out += new
                        n = len(new)
                except Exception as e:  # a batch job records the failure and goes on
                    state, err = "failed", _redact(f"{type(e).__name__}: {e}", rows)
                for k, v in zip(status, (int(shard), scan_id, state, n, err), strict=True):
                    status[k].append(v)
            if rows_out:
                write_shard(rows_out, self.out / f"{self.model_id}-{self.stamp}-{int(shard):05d}.parquet", self.schema)
        return {k: np.asarray(v) for k, v in status.items()}


def run_embedding(*, manifest: str | Path, model_path: str | Path, out_dir: str | Path, secret_file: str | Path,
                  workers: int = 2, threads_per_worker: int = 1, scans_per_shard: int = 8,
                  spacing_mm=None, patch_size: int | None = None, log=print) -> dict:
    import ray

    if workers < 1 or threads_per_worker < 1 or scans_per_shard < 1:
        raise InputError("embed: workers, threads per worker and scans per shard must be >= 1")
    model, meta = load_model(model_path)  # validated here, before any worker starts
    # files are checked per scan by the workers: a missing one fails that scan, not the night's job
    scans = read_manifest(manifest, model.schema, check_files=False).scans()
    secret = read_secret(secret_file)
    spacing, patch, recipe = embed_settings(meta, model_path, spacing_mm=spacing_mm, patch_size=patch_size)
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    done = done_scans(out, meta["model_id"])
    scan_ids = sorted(scans)
    chunks = [scan_ids[i:i + scans_per_shard] for i in range(0, len(scan_ids), scans_per_shard)]
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%S")
    log(f"embedding {len(scan_ids)} scans in {len(chunks)} shards with model {meta['model_id']} "
        f"({len(done)} scans already embedded by it) -> {out}")
    init_ray()
    ds = ray.data.from_items([{"shard": i, "scan_ids": c} for i, c in enumerate(chunks)],
                             override_num_blocks=max(len(chunks), 1))
    results = ds.map_batches(
        ShardEmbedder, batch_size=1, num_cpus=threads_per_worker,
        compute=ray.data.ActorPoolStrategy(size=min(workers, max(len(chunks), 1))),
        fn_constructor_kwargs={"manifest": str(Path(manifest).resolve()), "model_path": str(Path(model_path).resolve()),
                               "out_dir": str(out), "secret": secret, "done": done, "spacing_mm": spacing,
                               "patch_size": patch, "recipe": recipe, "threads": threads_per_worker, "stamp": stamp},
        runtime_env={"env_vars": ALLOCATOR_ENV},
    ).take_all()
    failed = [r for r in results if r["status"] == "failed"]
    with open(out / "embed-errors.jsonl", "a") if failed else open(os.devnull, "w") as f:
        for r in failed:
            rows = [m.row for m in scans[r["scan_id"]]]
            rec = {"run": stamp, "scan_key": keyed_id(r["scan_id"], secret), "manifest_rows": rows, "error": r["error"]}
            f.write(json.dumps(rec) + "\n")
    counts = {s: sum(r["status"] == s for r in results) for s in ("embedded", "unchanged", "failed")}
    report = {"run": stamp, "model_id": meta["model_id"], "scans": len(scan_ids), **counts,
              "tumors_embedded": int(sum(r["tumors"] for r in results)), "out_dir": str(out)}
    (out / "embed-report.json").write_text(json.dumps(report, indent=2))
    log(f"embedded {counts['embedded']} scans ({report['tumors_embedded']} tumors), {counts['unchanged']} unchanged, "
        f"{counts['failed']} failed" + (f" (see {out / 'embed-errors.jsonl'})" if failed else ""))
    return report
