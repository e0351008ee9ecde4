"""cluster/local.sh: `stop TEMP_DIR` stops that head only, never another Ray on the machine."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _session_pids(temp: Path) -> list[str]:
    r = subprocess.run(["pgrep", "-f", f"{temp.resolve()}/session_"], capture_output=True, text=True)
    return r.stdout.split()


def test_stop_stops_only_the_head_of_its_temp_dir(ray_head):
    import shutil
    import tempfile

    import ray

    other = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    env = {**os.environ, "RAY": str(Path(sys.executable).parent / "ray"), "NUM_CPUS": "1", "RAY_PORT": "6397",
           "DASHBOARD_PORT": "8277", "AGENT_PORT": "52397", "CLIENT_PORT": "9997",
           "RAY_AUTH_MODE": "disabled"}
    local = str(ROOT / "cluster" / "local.sh")
    r = subprocess.run([local, "start", str(other)], env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(_session_pids(other)) >= 2  # its GCS and raylet at least
    r = subprocess.run([local, "stop", str(other)], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and f"stopped the Ray head of {other.resolve()}" in r.stdout
    assert _session_pids(other) == []
    assert ray.cluster_resources().get("CPU") == 2  # the test suite's head (another temp dir) still answers
    r = subprocess.run([local, "stop", str(other)], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "no Ray head of" in r.stdout
    shutil.rmtree(other, ignore_errors=True)
