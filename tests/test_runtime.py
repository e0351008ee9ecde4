import platform

import pytest
import torch

from tumornet.runtime import tune_cpu_allocator


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_tune_cpu_allocator_applies_once_and_torch_still_works():
    assert tune_cpu_allocator() is True
    assert tune_cpu_allocator() is True  # idempotent
    big = torch.ones(64, 1024, 1024)  # 256 MiB: served from the heap now
    assert float(big.sum()) == 64 * 1024 * 1024
    del big
