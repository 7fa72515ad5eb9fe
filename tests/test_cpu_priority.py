"""The SAM actors' CPU niceness (raysam.pipeline.lower_cpu_priority), in a child process."""

import subprocess
import sys
import textwrap

CHILD = textwrap.dedent("""
    import os, threading
    from raysam.pipeline import lower_cpu_priority

    before = threading.Thread(target=threading.Event().wait, daemon=True)
    before.start()
    lower_cpu_priority(5)
    seen = {}
    after = threading.Thread(target=lambda: seen.setdefault("after", os.getpriority(os.PRIO_PROCESS, threading.get_native_id())))
    after.start(); after.join()
    print(os.getpriority(os.PRIO_PROCESS, 0), os.getpriority(os.PRIO_PROCESS, before.native_id), seen["after"])
    lower_cpu_priority(2)  # never lowers what is already higher
    print(os.getpriority(os.PRIO_PROCESS, 0))
""")


def test_every_thread_and_later_threads_get_the_niceness():
    out = subprocess.run([sys.executable, "-c", CHILD], check=True, capture_output=True, text=True).stdout.split()
    assert out == ["5", "5", "5", "5"]
