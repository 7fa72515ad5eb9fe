"""Worker memory: what a back-half task freed goes back to the system before the next task runs.

Ray keeps worker processes between tasks of any kind, so the heap glibc keeps after a merge or a
sink tile would be carried by every chip read that runs there next (raysam.runstats.release_heap).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

HEAP_PROGRAM = textwrap.dedent("""
    import numpy as np
    from raysam.runstats import memory_mb, release_heap

    big = np.ones(16 * 2**20 // 8)
    del big  # glibc raises its mmap threshold to 16 MB: smaller arrays now come from the heap
    arrays = [np.ones(2**19) for _ in range(100)]  # 100 x 4 MB
    keep = arrays[9::10]  # what stays alive pins the heap: free() alone returns nothing
    del arrays
    before = memory_mb()[1]
    release_heap()
    print(before, memory_mb()[1])
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_release_heap_returns_the_freed_heap():
    out = subprocess.run([sys.executable, "-c", HEAP_PROGRAM], capture_output=True, text=True, check=True).stdout
    before_mb, after_mb = map(float, out.split())
    assert before_mb - after_mb > 300, (before_mb, after_mb)  # 90 freed arrays of 4 MB
