"""The archive embedding job (Ray Data): manifest -> scans -> embedding shards, re-run nightly.

    ray_job.py embed --model runs/x/model.pt --manifest archive/manifest.csv --out embeddings/ \
        --secret-file site.key

The driver validates the manifest and the model, splits the scans into shards of
`scans_per_shard`, and a Ray Data actor pool (each actor loads the model once) embeds a shard
at a time and writes it as one Parquet file (embedder.shards). A scan whose image and mask are
unchanged since the same model embedded it, and whose manifest rows still say what its shard rows
copied (the patient, the tumors, their labels and case information: embedder.shards.stored_rows), is
skipped, so the nightly re-run only embeds new or changed scans; one whose files and tumors are
unchanged but whose labels, case information or patient changed gets its stored rows written again
with them (`relabeled`, no forward pass). A scan without a mask where no tumor is found gets one
marker row, so it is read once. Scans removed by `forget` stay out. The job holds the folder's lock
(one writer at a time). A scan that fails (unreadable file, empty mask, ...) is recorded in
`<out>/embed-errors.jsonl` with its manifest rows and the error, and the job keeps going;
`<out>/embed-report.json` sums up the run.
Shards, logs and the errors file carry no patient or scan id and no path: keyed hashes and manifest
row numbers instead.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import time
import warnings
from pathlib import Path

import numpy as np

from trainer.ray_setup import init_ray
from tumornet.config import EmbedConfig, check_precision
from tumornet.detect import DetectConfig
from tumornet.errors import InputError
from tumornet.export import load_model
from tumornet.io import atomic_write_text
from tumornet.keys import keyed_id, patient_key, read_secret
from tumornet.manifest import ManifestRow, folder_cohort, read_manifest_lenient, redact
from tumornet.recipe import RetrievalConfig
from tumornet.runtime import ALLOCATOR_ENV

from .embed import (
    embed_read,
    embed_settings,
    load_detector,
    read_scan,
    settings_fingerprint,
    source_hash,
)
from .forget import forgotten_keys
from .shards import (
    done_scans,
    folder_lock,
    model_shard_schema,
    no_tumor_row,
    rewrite_rows,
    same_tumors,
    stored_rows,
    write_shard,
)
from .transfer import from_bytes, pack, to_bytes, unpack

ERROR_COLUMNS = ("run", "row", "scan_key", "stage", "error_class", "message")  # embed-errors.jsonl, one JSON a line
HISTORY = 100  # runs kept in embed-report.json


def _row_dict(r: ManifestRow) -> dict:
    return {"row": r.row, "patient_id": r.patient_id, "scan_id": r.scan_id, "image": str(r.image),
            "mask": str(r.mask) if r.mask is not None else None, "tumor_id": r.tumor_id, "labels": r.labels,
            "tumor_values": list(r.tumor_values) if r.tumor_values is not None else None, "info": r.info}


def _row_of(d: dict) -> ManifestRow:
    return ManifestRow(row=d["row"], patient_id=d["patient_id"], scan_id=d["scan_id"], image=Path(d["image"]),
                       mask=Path(d["mask"]) if d["mask"] is not None else None, tumor_id=d["tumor_id"],
                       labels=d["labels"],
                       tumor_values=tuple(d["tumor_values"]) if d["tumor_values"] is not None else None,
                       info=d.get("info") or {})


def _failure(e: Exception, rows: list[ManifestRow], stage: str = "read") -> tuple[str, str, str]:
    """-> (stage, error class, message without the scan's paths and ids): an InputError (bad input
    files: missing_file, truncated, ...) or a MemoryError is a failure of `stage` (the stage it
    happened in: read, or embed for the network's part) with its own class; anything else is an
    `embed` failure named by its exception type."""
    r = rows[0]
    message = redact(str(e) if isinstance(e, InputError) else f"{type(e).__name__}: {e}",
                     (r.patient_id, r.scan_id, str(r.image), str(r.mask or "")))
    if isinstance(e, InputError):
        return stage, e.kind, message
    if isinstance(e, MemoryError):
        return stage, "out_of_memory", message or "out of memory"
    return "embed", type(e).__name__, message


def decode_shard(row: dict) -> dict:
    """Ray Data map, a CPU task: one shard's scans read (decode, resample, normalize, the masks'
    tumors measured; embedder.embed.read_scan) -> the shard with each scan's state and the read
    scans' arrays (embedder.transfer). A scan already embedded from the same files is `unchanged`;
    one that cannot be read is `failed` here, named and classified (the job goes on)."""
    item = json.loads(row["payload"])
    job, arrays, scans = item["job"], {}, []
    for n, scan in enumerate(item["scans"]):
        rows = [_row_of(d) for d in scan["rows"]]
        entry = {"scan_key": scan["scan_key"], "rows": scan["rows"], "state": "read"}
        try:
            entry["hash"] = source_hash(rows, job["settings"])
            if entry["hash"] in scan["done"]:
                entry["state"] = "unchanged"
            elif entry["hash"] == scan.get("relabel"):  # the same files, the same tumors: rows rewritten
                entry["state"] = "relabeled"
            else:
                entry["read"] = pack(read_scan(rows, spacing_mm=job["spacing_mm"]), arrays, f"s{n}")
        except (Exception, MemoryError) as e:  # a batch job records the failure and goes on
            entry["state"], entry["fail"] = "failed", _failure(e, rows)
        scans.append(entry)
    return {"shard": row["shard"], "payload": json.dumps({"job": job, "scans": scans}), "arrays": to_bytes(arrays)}


def inference_precision(device, precision: str):
    """The autocast context of the network's forward passes on `device` (see check_precision)."""
    import contextlib

    import torch

    check_precision(torch.device(device).type == "cuda", precision)
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


class ShardEmbedder:
    """A Ray Data actor: runs the network on one decoded shard per call (on its GPU when the job
    asks for GPUs) and writes the shard. It takes no constructor arguments (Ray Data would put them
    in the object store, and Ray warns about that for restartable actors): each item carries the
    job's settings (paths, spacing, recipe: small JSON) and its scans; the model is loaded once, at
    the first item, and kept."""

    def __init__(self):
        self.model = self.detector = None

    def _setup(self, job: dict) -> None:
        import torch

        torch.set_num_threads(job["threads"])
        self.model, meta = load_model(job["model_path"])
        if job.get("detector_path"):
            self.detector = load_model(job["detector_path"])[0]
        if job["gpus"] > 0:
            if not torch.cuda.is_available():
                raise RuntimeError("the job asked for GPUs but this actor sees no CUDA device")
            self.model.to("cuda")
            if self.detector is not None:
                self.detector.to("cuda")
        self.model_id = meta["model_id"]
        self.recipe = (RetrievalConfig(**job["recipe"]), job["stats"])
        self.schema = model_shard_schema(self.model, self.recipe[0], info=job.get("info", ()))
        self.detect = DetectConfig(**job["detect"])
        self.job = job

    def __call__(self, batch: dict) -> dict:
        status = {k: [] for k in ("shard", "scan_key", "row", "status", "tumors", "stage", "error_class", "message")}
        if "arrays" not in batch:  # a CPU job: this actor reads the shard itself (one stage)
            decoded = [decode_shard({"shard": sh, "payload": p}) for sh, p in zip(batch["shard"], batch["payload"],
                                                                                   strict=True)]
            batch = {k: [d[k] for d in decoded] for k in ("shard", "payload", "arrays")}
        for shard, payload, blob in zip(batch["shard"], batch["payload"], batch["arrays"], strict=True):
            item = json.loads(payload)
            if self.model is None:
                self._setup(item["job"])
            job, secret, arrays = self.job, bytes.fromhex(self.job["secret"]), from_bytes(blob)
            rows_out = []
            for scan in item["scans"]:
                rows = [_row_of(d) for d in scan["rows"]]
                state, n, fail = scan["state"], 0, tuple(scan.get("fail", ("", "", "")))
                if state == "read":
                    state = "embedded"
                    try:
                        with inference_precision(self.model.device, job["precision"]):
                            new = embed_read(self.model, self.model_id, rows, unpack(scan["read"], arrays),
                                             spacing_mm=job["spacing_mm"], patch_size=job["patch_size"],
                                             secret=secret, file_hash=scan["hash"], recipe=self.recipe,
                                             detect=self.detect, detector=self.detector)
                        # a scan where no tumor is found gets a marker row: the next night skips it
                        rows_out += new or [no_tumor_row(
                            scan["scan_key"], patient_key(rows[0].patient_id, secret), self.model_id,
                            scan["hash"], rows[0].info)]
                        n = len(new)
                    except (Exception, MemoryError) as e:  # recorded, the job goes on
                        state, fail = "failed", _failure(e, rows, stage="embed")
                values = (int(shard), scan["scan_key"], rows[0].row, state, n, *fail)
                for k, v in zip(status, values, strict=True):
                    status[k].append(v)
            if rows_out:
                name = f"{self.model_id}-{job['stamp']}-{int(shard):05d}.parquet"
                write_shard(rows_out, Path(job["out_dir"]) / name, self.schema)
        return {k: np.asarray(v) for k, v in status.items()}


class Progress:
    """One console line per `every` seconds (and at the end): counts, rate and ETA."""

    def __init__(self, total: int, log, every: float = 10.0):
        self.total, self.log, self.every = total, log, every
        self.counts = {"embedded": 0, "unchanged": 0, "relabeled": 0, "failed": 0}
        self.t0 = self.last = time.perf_counter()

    def add(self, state: str) -> None:
        self.counts[state] += 1
        now = time.perf_counter()
        if now - self.last >= self.every or self.done == self.total:
            self.last = now
            self.log(self.line())

    @property
    def done(self) -> int:
        return sum(self.counts.values())

    def line(self) -> str:
        elapsed = time.perf_counter() - self.t0
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else float("nan")
        c = self.counts
        return (f"embed: {self.done}/{self.total} scans ({c['embedded']} embedded, {c['unchanged']} unchanged, "
                + (f"{c['relabeled']} relabeled, " if c["relabeled"] else "")
                + f"{c['failed']} failed), {rate:.2f} scans/s, ETA {eta:.0f} s")


def _append_errors(path: Path, records: list[dict]) -> None:
    if records:
        with open(path, "a") as f:
            for rec in records:
                f.write(json.dumps({k: rec[k] for k in ERROR_COLUMNS}) + "\n")


def _append_history(path: Path, report: dict) -> None:
    runs = []
    if path.is_file():
        try:
            old = json.loads(path.read_text())
            runs = old.get("runs", []) if isinstance(old, dict) else []
        except json.JSONDecodeError:
            runs = []
    atomic_write_text(path, json.dumps({"last": report, "runs": [*runs, report][-HISTORY:]}, indent=2))


def failure_message(report: dict) -> str:
    """Why a run's report is not ok, in words."""
    why = report["stopped"] or (f"{report['failure_rate']:.1%} of the scans failed, above --max-failure-rate "
                                f"{report['max_failure_rate']:.1%}")
    return f"{why} (see {Path(report['out_dir']) / 'embed-errors.jsonl'})"


def run_embedding(*, manifest: str | Path, model_path: str | Path, out_dir: str | Path, secret_file: str | Path,
                  workers: int = 2, threads_per_worker: int = 1, scans_per_shard: int = 8,
                  spacing_mm=None, patch_size: int | None = None, max_failure_rate: float = 0.05,
                  min_volume_ml: float | None = None, gpus_per_worker: float = 0.0, precision: str = "fp32",
                  detector: str | Path = "", log=print) -> dict:
    """Embed every valid scan of the manifest (or of a plain folder of NIfTI files: scans without a
    mask) -> the run's report (also in `<out>/embed-report.json`, with the history of earlier runs);
    invalid manifest rows and failed scans go to `<out>/embed-errors.jsonl`. report["ok"] is False
    when the failure share exceeds max_failure_rate. Scans without a mask get their tumors from the
    segmentation head (the model's `detect` settings; min_volume_ml overrides its minimum), or from a
    `detector` model's (its own `detect` settings; embedder.embed.load_detector).

    `workers` actors run the network (ShardEmbedder), each with `threads_per_worker` CPUs and
    `gpus_per_worker` GPUs (0: CPU, fp32; > 0: CUDA, in `precision` fp32 / bf16 / fp16). With GPUs,
    CPU tasks read each shard's scans (decode, resample: decode_shard) and feed the actors, so a GPU
    never waits on gzip; on CPU the actors read their shards themselves (CPU tasks beside actors
    that hold every CPU would never be scheduled)."""
    import ray

    EmbedConfig(workers=workers, threads_per_worker=threads_per_worker, gpus_per_worker=gpus_per_worker,
                precision=precision, scans_per_shard=scans_per_shard, max_failure_rate=max_failure_rate)  # checked
    model, meta = load_model(model_path)  # validated here, before any worker starts
    secret = read_secret(secret_file)
    # row by row: an invalid row skips its scan (recorded), every valid scan is embedded; files are
    # checked per scan by the workers, so a missing or broken file fails that scan, not the night
    if Path(manifest).is_dir():
        cohort, bad_rows = folder_cohort(manifest, model.schema), []
    else:
        cohort, bad_rows = read_manifest_lenient(manifest, model.schema)
    scans = cohort.scans()
    spacing, patch, recipe = embed_settings(meta, model_path, spacing_mm=spacing_mm, patch_size=patch_size)
    # a detector is validated here too, before any worker starts
    _, detector_meta, detect = load_detector(detector, meta, spacing, min_volume_ml=min_volume_ml)
    detector_id = detector_meta["model_id"] if detector_meta else None
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    with folder_lock(out, "embed"):  # one writer at a time: a second run stops before writing
        tasks = model.schema.names
        info_columns = sorted({c for r in cohort.rows for c in r.info})  # the manifest's info_* columns in use
        done = done_scans(out, meta["model_id"], tasks)
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%S")
        errors = [{"run": stamp, "row": e.row, "scan_key": keyed_id(e.scan_id, secret) if e.scan_id else "",
                   "stage": "manifest", "error_class": "invalid_row", "message": e.redacted()} for e in bad_rows]
        # scans removed from this archive by `forget` stay out while the manifest still lists them
        gone_patients, gone_scans = forgotten_keys(out)
        gone = sorted(s for s, rows in scans.items() if keyed_id(s, secret) in gone_scans
                      or patient_key(rows[0].patient_id, secret) in gone_patients)
        errors += [{"run": stamp, "row": scans[s][0].row, "scan_key": keyed_id(s, secret), "stage": "manifest",
                    "error_class": "forgotten", "message": "<scan>: removed from this archive by `forget` (its "
                    "patient or itself); take its rows out of the manifest"} for s in gone]
        scan_ids = sorted(set(scans) - set(gone))
        _append_errors(out / "embed-errors.jsonl", errors)  # recorded before any scan is embedded
        items, rows_changed, updates = [], 0, {}
        for s in scan_ids:
            key, rows = keyed_id(s, secret), scans[s]
            stored = done.get(key)
            pk = patient_key(rows[0].patient_id, secret)
            now = stored_rows(pk, [(r.tumor_id, tuple(r.labels.get(t, -1) for t in tasks), r.info) for r in rows],
                              masked=rows[0].mask is not None)
            item = {"scan_key": key, "done": [], "rows": [_row_dict(r) for r in rows]}
            if stored is not None and stored[1] == now:
                item["done"] = [stored[0]]
            elif stored is not None:  # the manifest's rows changed, the files maybe not
                rows_changed += 1
                if same_tumors(stored[1], now):  # files unchanged too (the read task checks): rows rewritten
                    item["relabel"] = stored[0]
                    updates[key] = ({"patient_key": pk, "all": rows[0].info} if rows[0].mask is None else
                                    {"patient_key": pk, "tumors": {r.tumor_id: {**{f"label_{t}": r.labels.get(t, -1)
                                                                                   for t in tasks}, **r.info}
                                                                   for r in rows}})
            items.append(item)
        chunks = [items[i:i + scans_per_shard] for i in range(0, len(items), scans_per_shard)]
        invalid_scans = len({e.scan_id for e in bad_rows if e.scan_id}) + sum(1 for e in bad_rows if not e.scan_id)
        log(f"embed: {len(scan_ids)} valid scans ({invalid_scans} skipped for invalid manifest rows"
            + (f", {len(gone)} removed by `forget`" if gone else "") + f") in {len(chunks)} "
            f"shards with model {meta['model_id']} ({len(done)} scans already embedded by it"
            + (f", {rows_changed} of them with changed manifest rows" if rows_changed else "") + ")"
            + (f", tumors without a mask found by detector {detector_id}" if detector_id else "") + f" -> {out}")
        progress = Progress(len(scan_ids), log)
        results, stopped = [], ""
        if chunks:
            init_ray()
            job = {"model_path": str(Path(model_path).resolve()), "out_dir": str(out), "secret": secret.hex(),
                   "spacing_mm": spacing, "patch_size": patch, "recipe": dataclasses.asdict(recipe[0]),
                   "stats": recipe[1], "detect": dataclasses.asdict(detect), "gpus": gpus_per_worker,
                   "precision": precision, "threads": threads_per_worker, "stamp": stamp,
                   "detector_path": str(Path(detector).resolve()) if detector else "", "info": info_columns,
                   "settings": settings_fingerprint(spacing, patch, recipe, detect, detector_id)}
            ds = ray.data.from_items([{"shard": i, "payload": json.dumps({"job": job, "scans": c})}
                                      for i, c in enumerate(chunks)], override_num_blocks=len(chunks))
            # max_restarts=0, deliberately: a scan's own failure is caught inside the actor, so an actor
            # dies only on a hard crash (OOM kill, segfault), and restarting it would replay the same
            # shard forever (Ray Data's default: infinite restarts and task retries). The job stops
            # instead, keeping every shard written, and the next run resumes with what is missing.
            # (Ray 2.60-2.63 take max_restarts only through the deprecated **ray_remote_args, hence
            # the pin ray < 2.64 in pyproject.toml and this one deprecation notice filtered here)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
                if gpus_per_worker > 0:  # reads in CPU tasks, so that a GPU never waits on gzip
                    ds = ds.map(decode_shard, num_cpus=1, runtime_env={"env_vars": ALLOCATOR_ENV})
                stream = ds.map_batches(
                    ShardEmbedder, batch_size=1, num_cpus=threads_per_worker, num_gpus=gpus_per_worker,
                    compute=ray.data.ActorPoolStrategy(size=min(workers, len(chunks))),
                    runtime_env={"env_vars": ALLOCATOR_ENV}, max_restarts=0,
                ).iter_rows()
            try:
                for r in stream:
                    results.append(r)
                    progress.add(str(r["status"]))
                    if r["status"] == "failed":
                        _append_errors(out / "embed-errors.jsonl", [{
                            "run": stamp, "row": int(r["row"]), "scan_key": str(r["scan_key"]),
                            "stage": str(r["stage"]), "error_class": str(r["error_class"]),
                            "message": str(r["message"])}])
            except Exception as e:  # an actor crashed: what was written stays; the next run resumes
                stopped = f"{type(e).__name__}: the embedding stopped after {progress.done} of {len(scan_ids)} scans"
                log(f"embed: {stopped}")
                _append_errors(out / "embed-errors.jsonl", [{"run": stamp, "row": 0, "scan_key": "", "stage": "embed",
                                                             "error_class": "job_stopped", "message": stopped}])
        # scans whose files are unchanged and whose manifest rows changed only in what the rows copy: their
        # rows written again with it, from the stored ones (no forward pass)
        relabeled = [str(r["scan_key"]) for r in results if r["status"] == "relabeled"]
        rewrite_rows(out, meta["model_id"], {k: updates[k] for k in relabeled},
                     model_shard_schema(model, recipe[0], info_columns), stamp)
        counts = dict(progress.counts)
        total = len(scan_ids) + invalid_scans
        failure_rate = (counts["failed"] + invalid_scans) / total if total else 0.0
        report = {"run": stamp, "model_id": meta["model_id"], "detector_id": detector_id, "scans": total, **counts,
                  "rows_changed": rows_changed, "forgotten": len(gone), "skipped_invalid_rows": len(bad_rows),
                  "skipped_scans": invalid_scans,
                  "tumors_embedded": int(sum(int(r["tumors"]) for r in results)),
                  "failure_rate": round(failure_rate, 4),
                  "max_failure_rate": max_failure_rate, "ok": failure_rate <= max_failure_rate and not stopped,
                  "stopped": stopped, "out_dir": str(out)}
        _append_history(out / "embed-report.json", report)
        log(f"embedded {counts['embedded']} scans ({report['tumors_embedded']} tumors), {counts['unchanged']} "
            f"unchanged, " + (f"{counts['relabeled']} rewritten with their new manifest rows (no forward pass), "
                              if counts["relabeled"] else "")
            + f"{counts['failed']} failed, {invalid_scans} skipped for invalid rows"
            + (f", {len(gone)} left out as removed by `forget`" if gone else "")
            + (f" (see {out / 'embed-errors.jsonl'})" if counts["failed"] or bad_rows or gone else ""))
        return report
