"""Joining or starting Ray for a command (training, embedding, experiments), with its logging set.

Inside `ray job submit` this joins the job's cluster; a plain local run starts a local Ray. Ray's
own INFO logs go to its log folder (`<temp dir>/session_latest/logs`), not the console: the
driver and every task and actor log at WARNING (`ray.LoggingConfig`), Ray Train's internal logs
too (`ray.train.LoggingConfig`, given to RunConfig by trainer.launch), and Ray Data's (its `ray.data`
logger; its progress bars are off: the job prints its own progress line). Our own lines (the
epoch line of rank 0, the job's progress) are plain prints and still reach the console. Ray's
notices of what we chose stay off it too: that token authentication is on (it stays on), that Ray
Data's progress bars are off; and a local Ray started here runs no Ray Train preemption watcher (it
watches for cloud nodes being taken back; a local machine has none; on a cluster it runs).

A local Ray started here tells its own processes where it is (RAY_ADDRESS, inherited by every
worker): Ray's state API, which Ray Train's placement-group cleaner calls from inside an actor, would
otherwise look for a running Ray by itself and fail ("Found multiple active Ray instances") when
another Ray runs on the same machine (e.g. a `ray start` cluster, or the test suite's head).
"""

from __future__ import annotations

import logging
import os
import socket

CONSOLE_LEVEL = "WARNING"
# Ray's notices that say what we chose (logger -> the message's start): kept off the console
NOTICES = {"ray._private.authentication.authentication_token_setup": "Token authentication is enabled for this Ray",
           "ray.data._internal.progress": "Progress bars disabled"}


class DropNotice(logging.Filter):
    """Drops the log records whose message starts with `prefix` (and keeps every other)."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


def quiet_notices() -> None:
    """Ray's NOTICES are dropped where they are logged (once per logger, however often called)."""
    for name, prefix in NOTICES.items():
        notices = logging.getLogger(name)
        if not any(isinstance(f, DropNotice) for f in notices.filters):
            notices.addFilter(DropNotice(prefix))


# the RAY_ADDRESS this process set for the local Ray it started (so a later init_ray after
# ray.shutdown starts a new one instead of joining the stopped one)
_STARTED: dict[str, str] = {}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def init_ray() -> None:
    import ray
    import ray.data

    logging.getLogger("ray.data").setLevel(CONSOLE_LEVEL)
    quiet_notices()
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    if ray.is_initialized():
        return
    # A local Ray started here runs its workers at niceness 0 (Ray's default is 15, which lets Ray's
    # own daemons preempt training on a small machine: 5 % of a step measured on 2 cores).
    os.environ.setdefault("RAY_worker_niceness", "0")
    if _STARTED and os.environ.get("RAY_ADDRESS") == _STARTED.get("address"):
        del os.environ["RAY_ADDRESS"]  # ours, of a local Ray since shut down
    address, chosen_port = None, False  # None: join RAY_ADDRESS (ray job submit) or a `ray start` cluster
    if "RAY_ADDRESS" not in os.environ:
        import ray._private.services as services

        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        if services.canonicalize_bootstrap_address(None) is None:  # no `ray start` cluster here: a new one
            # on a port chosen here, so that its processes can be told where it is (RAY_ADDRESS)
            address, chosen_port = "local", "RAY_GCS_SERVER_PORT" not in os.environ  # a port the user set is kept
            port = os.environ.setdefault("RAY_GCS_SERVER_PORT", str(free_port()))
            os.environ["RAY_ADDRESS"] = _STARTED["address"] = f"{services.get_node_ip_address()}:{port}"
    try:
        ray.init(address=address, logging_config=ray.LoggingConfig(log_level=CONSOLE_LEVEL))
    except BaseException:
        if address == "local":
            del os.environ["RAY_ADDRESS"]
        raise
    finally:
        if chosen_port:
            del os.environ["RAY_GCS_SERVER_PORT"]


def train_logging_config():
    import ray.train

    return ray.train.LoggingConfig(log_level=CONSOLE_LEVEL)
