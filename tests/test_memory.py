"""Worker memory: the heap freed in a worker goes back to the system around each back-half task.

Ray keeps worker processes between tasks of any kind, so the heap glibc keeps after a merge or a
sink tile would be carried by every chip read that runs there next, and the heap chip reads left
by the next merge (raysam.runstats.release_heap, raysam.tasks).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

FREED_HEAP = textwrap.dedent("""
    import numpy as np
    from raysam.runstats import memory_mb, release_heap

    big = np.ones(16 * 2**20 // 8)
    del big  # glibc raises its mmap threshold to 16 MB: smaller arrays now come from the heap
    arrays = [np.ones(2**19) for _ in range(100)]  # 100 x 4 MB
    keep = arrays[9::10]  # what stays alive pins the heap: free() alone returns nothing
    del arrays
    before = memory_mb()[1]
""")
HEAP_PROGRAM = FREED_HEAP + "release_heap()\nprint(before, memory_mb()[1])\n"
# A back-half task run after it, in the same process (no run going on: its peak goes nowhere).
TASK_PROGRAM = FREED_HEAP + textwrap.dedent("""
    from raysam import tasks
    print(before, tasks._measured("merge", lambda: memory_mb()[1]))
""")


def _printed_mb(program: str) -> list[float]:
    """The MB figures ``program`` prints, run in a fresh Python (its own heap and allocators)."""
    out = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, check=True).stdout
    return [float(v) for v in out.split()]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_release_heap_returns_the_freed_heap():
    before_mb, after_mb = _printed_mb(HEAP_PROGRAM)
    assert before_mb - after_mb > 300, (before_mb, after_mb)  # 90 freed arrays of 4 MB


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_a_back_half_task_starts_without_the_heap_earlier_work_freed():
    """A merge or sink task in a worker whose chip reads left freed heap starts without it: its
    peak is its own, not the reads' leftovers."""
    before_mb, in_task_mb = _printed_mb(TASK_PROGRAM)
    assert before_mb - in_task_mb > 300, (before_mb, in_task_mb)


ARROW_FREED = textwrap.dedent("""
    import io
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from raysam.runstats import memory_mb, release_heap

    for _ in range(3):  # GeoParquet-like parts written, as a sink tile's are
        table = pa.table({"area": np.arange(4_000_000, dtype="f8"), "geometry": pa.array([b"x" * 64] * 4_000_000)})
        buf = io.BytesIO()
        pq.write_table(table, buf)
        del table, buf
    assert pa.total_allocated_bytes() == 0  # every buffer freed: the pool only keeps the pages
    before = memory_mb()[1]
    release_heap()
    print(before, memory_mb()[1])
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="private memory from /proc")
def test_release_heap_returns_what_arrows_pool_kept():
    """Arrow's own allocator (mimalloc or jemalloc) keeps freed buffers' pages, which glibc's
    malloc_trim cannot return: a chip read after a sink task carried them."""
    before_mb, after_mb = _printed_mb(ARROW_FREED)
    assert before_mb - after_mb > 150, (before_mb, after_mb)
