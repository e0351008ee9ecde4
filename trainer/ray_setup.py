"""Joining or starting Ray for a command (training, embedding, experiments), with its logging set.

Inside `ray job submit` this joins the job's cluster; a plain local run starts a local Ray. Ray's
own INFO logs go to its log folder (`<temp dir>/session_latest/logs`), not the console: the
driver and every task and actor log at WARNING (`ray.LoggingConfig`), Ray Train's internal logs
too (`ray.train.LoggingConfig`, given to RunConfig by trainer.launch), and Ray Data's (its `ray.data`
logger; its progress bars are off: the job prints its own progress line). Our own lines (the
epoch line of rank 0, the job's progress) are plain prints and still reach the console.
"""

from __future__ import annotations

import logging
import os

CONSOLE_LEVEL = "WARNING"


def init_ray() -> None:
    import ray
    import ray.data

    logging.getLogger("ray.data").setLevel(CONSOLE_LEVEL)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    if ray.is_initialized():
        return
    # A local Ray started here runs its workers at niceness 0 (Ray's default is 15, which lets Ray's
    # own daemons preempt training on a small machine: 5 % of a step measured on 2 cores).
    os.environ.setdefault("RAY_worker_niceness", "0")
    ray.init(logging_config=ray.LoggingConfig(log_level=CONSOLE_LEVEL))


def train_logging_config():
    import ray.train

    return ray.train.LoggingConfig(log_level=CONSOLE_LEVEL)
