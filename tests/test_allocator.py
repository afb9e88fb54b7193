"""Freed memory kept for reuse: fewer page faults for repeated large allocations, and the opt-out."""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys

import pytest

from automedseg.allocator import retain_freed_memory

# Allocate, write and free a 64 MiB tensor 10 times, then 20 times more; print whether retaining is in effect
# and the page faults of the 20.
_SCRIPT = """
import json, resource, sys
import torch
from automedseg.allocator import retain_freed_memory
on = retain_freed_memory() if sys.argv[1] == "1" else False
for _ in range(10):  # glibc settles on its reuse after a few rounds
    torch.empty(16 * 2**20).fill_(1.0)
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    torch.empty(16 * 2**20).fill_(1.0)
print(json.dumps({"on": on, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0}))
"""


def _run(retain: bool, **env: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _SCRIPT, "1" if retain else "0"], capture_output=True, text=True,
                         check=True, env={**os.environ, **env})
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_is_idempotent() -> None:
    assert retain_freed_memory() == retain_freed_memory()


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_repeated_large_allocations_stop_faulting() -> None:
    off, on = _run(False), _run(True)
    assert on["on"] and not off["on"]
    # 20 x 64 MiB written afresh is ~330,000 faults of 4 KiB pages (fewer with larger pages); reused, next to none
    assert off["faults"] > 20 * 64 * 2**20 / resource.getpagesize() / 4
    assert on["faults"] < off["faults"] / 20


def test_can_be_switched_off() -> None:
    assert _run(True, AUTOMEDSEG_RETAIN_MEMORY="0")["on"] is False


def test_a_worker_can_hand_it_back() -> None:
    script = ("import json\nfrom automedseg import allocator as A\non = A.retain_freed_memory()\n"
              "A.release_freed_memory()\nprint(json.dumps([on, A.retain_freed_memory()]))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    on, again = json.loads(out.stdout.strip().splitlines()[-1])
    assert again is False  # released for good in that process
    assert on == (platform.system() == "Linux" and platform.libc_ver()[0] == "glibc")
