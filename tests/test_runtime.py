"""The CPU allocator setting: a freed large buffer stays in the heap, so using it again does not
page-fault it back in (the effect the training speed-up rests on). Each case runs in its own
process: the setting is per process and must not leak into the rest of the test session."""

import platform
import subprocess
import sys

import pytest

PROBE = """
import resource, sys
import numpy as np
from tumornet.runtime import tune_cpu_allocator
if sys.argv[1] == "tuned":
    assert tune_cpu_allocator() is True and tune_cpu_allocator() is True  # idempotent
def use():
    x = np.empty(32 * 2**20, dtype=np.float32)  # 128 MiB through malloc
    x.fill(1.0)
    assert x[-1] == 1.0
use(); use()  # warm-up: the first allocation faults in any case
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    use()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    r = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=120,
                       env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    return int(r.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_tuned_allocator_reuses_freed_large_buffers_without_page_faults():
    default, tuned = _faults("default"), _faults("tuned")
    # default glibc: each 128 MiB buffer is a fresh mmap, faulted in again each time (32,768 4 KiB
    # pages, or 64 huge pages where transparent huge pages are on); tuned: the heap's pages are reused
    assert default >= 4 * 60
    assert tuned <= default / 10
