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
from tumornet.volumes import head_box_voxels


class PatchStream:
    def __init__(self, scans: Sequence[CachedScan], cfg: TrainConfig, tasks: Sequence[str], *, rank: int,
                 start_step: int, end_step: int):
        if not scans:
            raise ValueError(f"worker {rank} has no training scan: use fewer workers or more scans")
        self.scans, self.cfg, self.tasks, self.rank = list(scans), cfg, list(tasks), rank
        self.arrays = [s.arrays() for s in self.scans]
        self.heads = [head_box_voxels(np.asarray(image)) for image, _ in self.arrays]  # the patches' frames
        self.augment = Augment(flip_lr=cfg.flip_lr, intensity_scale=cfg.intensity_scale,
                               intensity_shift=cfg.intensity_shift, box_jitter=cfg.box_jitter)
        self.queue: queue.Queue = queue.Queue(maxsize=max(cfg.prefetch, 1))
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(start_step, end_step), daemon=True)
        self.thread.start()

    def batch_for(self, step: int) -> dict:
        rng = np.random.default_rng([self.cfg.seed, self.rank, step])
        samples = []
        for _ in range(self.cfg.batch_size):
            i = int(rng.integers(len(self.scans)))
            image, instances = self.arrays[i]
            tumors = self.scans[i].tumors
            anywhere = self.cfg.background_fraction > 0 and rng.random() < self.cfg.background_fraction
            index = None if anywhere else int(rng.integers(len(tumors)))
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
