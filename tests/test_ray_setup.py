"""Ray's notices of what we chose are kept off the console, and nothing else of Ray's is; a local Ray
started beside another still finds itself."""

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.ray_setup import NOTICES, quiet_notices

ROOT = Path(__file__).resolve().parent.parent


def test_only_the_named_notices_are_dropped(caplog):
    quiet_notices()
    quiet_notices()  # twice: one filter per logger
    caplog.set_level(logging.WARNING)
    for name, prefix in NOTICES.items():
        log = logging.getLogger(name)
        assert len(log.filters) == 1
        log.warning(prefix + ". To enable, set ...")
        log.warning("something else went wrong")
    kept = "Progress bars disabled (a logger not named: kept)"
    logging.getLogger("ray.data").warning(kept)
    assert [r.getMessage() for r in caplog.records] == ["something else went wrong"] * len(NOTICES) + [kept]


PROBE = """
import os, ray
from trainer.ray_setup import init_ray

@ray.remote(num_cpus=0)
def where():
    from ray.util.state import list_actors
    list_actors()  # Ray's state API finds the Ray it runs in (Ray Train's placement-group cleaner calls it)
    return os.environ["RAY_ADDRESS"]

init_ray()
first = ray.get_runtime_context().gcs_address
assert ray.get(where.remote()) == first == os.environ["RAY_ADDRESS"]
ray.shutdown()
init_ray()  # after a shutdown: a new local Ray, not the stopped one
second = ray.get_runtime_context().gcs_address
assert second != first and ray.get(where.remote()) == second
assert "RAY_GCS_SERVER_PORT" not in os.environ
print("ok")
"""


@pytest.mark.ray
@pytest.mark.slow
def test_a_local_ray_beside_another_tells_its_workers_where_it_is(ray_head):
    """The test suite's head is a second Ray on this machine: a local Ray started by init_ray still
    answers its own workers' state-API calls (they would fail with "Found multiple active Ray instances")."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_GCS_SERVER_PORT")}
    done = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]
