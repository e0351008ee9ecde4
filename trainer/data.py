"""Feeding a worker: its shard of preprocessed scans, patches made ahead by a background thread.

The batch of step s depends only on (seed, rank, s): a resumed run sees exactly the batches an
uninterrupted run would have seen.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Sequence

import numpy as np

from tumornet.cache import CachedScan
from tumornet.config import TrainConfig
from tumornet.patches import Augment, collate, make_sample
from tumornet.tumors import is_dark
from tumornet.volumes import head_box_voxels


class PatchStream:
    def __init__(self, scans: Sequence[CachedScan], cfg: TrainConfig, tasks: Sequence[str], *, rank: int,
                 start_step: int, end_step: int):
        if not scans:
            raise ValueError(f"worker {rank} has no training scan: use fewer workers or more scans")
        self.scans, self.cfg, self.tasks, self.rank = list(scans), cfg, list(tasks), rank
        self.arrays = [s.arrays() for s in self.scans]
        self.heads = [head_box_voxels(np.asarray(image)) for image, _ in self.arrays]  # the patches' frames
        # train.dark_weight: (scan, tumor) pairs and their chances; None = a scan, then one of its tumors
        self.pick = None if cfg.dark_weight == 1.0 else self._dark_weighted(cfg.dark_weight)
        self.augment = Augment(flip_lr=cfg.flip_lr, intensity_scale=cfg.intensity_scale,
                               intensity_shift=cfg.intensity_shift, box_jitter=cfg.box_jitter)
        self.queue: queue.Queue = queue.Queue(maxsize=max(cfg.prefetch, 1))
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(start_step, end_step), daemon=True)
        self.thread.start()

    def _dark_weighted(self, weight: float) -> tuple[list[tuple[int, int]], np.ndarray]:
        """Every (scan, tumor) pair with its chance: a scan's tumors share its 1 / n_scans, a dark tumor
        (tumornet.tumors.is_dark) counting `weight` times a bright one."""
        pairs, chance = [], []
        for i, (scan, (image, instances)) in enumerate(zip(self.scans, self.arrays, strict=True)):
            for j, t in enumerate(scan.tumors):
                pairs.append((i, j))
                chance.append((weight if is_dark(image, instances, t.tumor_id, t.bbox) else 1.0) / len(scan.tumors))
        chance = np.asarray(chance)
        return pairs, chance / chance.sum()

    def batch_for(self, step: int) -> dict:
        rng = np.random.default_rng([self.cfg.seed, self.rank, step])
        samples = []
        for _ in range(self.cfg.batch_size):
            if self.pick is None:
                i = int(rng.integers(len(self.scans)))
            else:
                i, j = self.pick[0][int(rng.choice(len(self.pick[0]), p=self.pick[1]))]
            image, instances = self.arrays[i]
            tumors = self.scans[i].tumors
            anywhere = self.cfg.background_fraction > 0 and rng.random() < self.cfg.background_fraction
            index = None if anywhere else int(rng.integers(len(tumors))) if self.pick is None else j
            samples.append(make_sample(image, instances, tumors, index, self.cfg.patch_size, rng, self.tasks,
                                       self.augment, self.heads[i]))
        return collate(samples)

    def _run(self, start: int, end: int) -> None:
        try:
            for step in range(start, end):
                batch = self.batch_for(step)
                while not self.stop.is_set():
                    try:
                        self.queue.put((step, batch), timeout=0.5)
                        break
                    except queue.Full:
                        continue
                if self.stop.is_set():
                    return
        except BaseException as e:  # surface errors in the training thread
            self.queue.put((None, e))

    def next(self) -> tuple[int, dict, float]:
        """-> (step, batch, seconds waited for it)."""
        t0 = time.perf_counter()
        step, batch = self.queue.get()
        if step is None:
            raise batch
        return step, batch, time.perf_counter() - t0

    def close(self) -> None:
        self.stop.set()


def validation_batches(scans: Sequence[CachedScan], cfg: TrainConfig, tasks: Sequence[str]):
    """One centred, unaugmented patch per held-out tumor, in batches of cfg.batch_size."""
    samples = []
    for s in scans:
        image, instances = s.arrays()
        head = head_box_voxels(np.asarray(image))
        for i in range(len(s.tumors)):
            samples.append(make_sample(image, instances, s.tumors, i, cfg.patch_size, None, tasks, head=head))
            if len(samples) == cfg.batch_size:
                yield collate(samples)
                samples = []
    if samples:
        yield collate(samples)
