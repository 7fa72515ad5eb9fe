"""The SAM actors' CPU niceness (raysam.pipeline.lower_cpu_priority), in a child process."""

import subprocess
import sys
import textwrap

CHILD = textwrap.dedent("""
    import os, threading
    from raysam.pipeline import lower_cpu_priority

    base = os.getpriority(os.PRIO_PROCESS, 0)
    before = threading.Thread(target=threading.Event().wait, daemon=True)
    before.start()
    lower_cpu_priority(4)
    seen = {}
    after = threading.Thread(target=lambda: seen.setdefault("after", os.getpriority(os.PRIO_PROCESS, threading.get_native_id())))
    after.start(); after.join()
    print(base, os.getpriority(os.PRIO_PROCESS, 0), os.getpriority(os.PRIO_PROCESS, before.native_id), seen["after"])
    lower_cpu_priority(30)  # 19 at most
    print(os.getpriority(os.PRIO_PROCESS, 0), os.getpriority(os.PRIO_PROCESS, before.native_id))
""")


def test_every_thread_and_later_threads_get_nicer_up_to_19():
    base, *nice = map(int, subprocess.run([sys.executable, "-c", CHILD], check=True, capture_output=True,
                                          text=True).stdout.split())
    assert nice == [min(19, base + 4)] * 3 + [19, 19]


THREAD_CHILD = textwrap.dedent("""
    import os, threading
    from raysam.pipeline import lower_cpu_priority

    base = os.getpriority(os.PRIO_PROCESS, 0)
    seen = {}
    def segmenting():  # as raysam.inprocess's chip thread
        lower_cpu_priority(4, this_thread_only=True)
        seen["thread"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    thread = threading.Thread(target=segmenting)
    thread.start(); thread.join()
    print(base, seen["thread"], os.getpriority(os.PRIO_PROCESS, 0))
""")


def test_this_thread_only_leaves_the_drivers_thread_as_it_was():
    base, thread, main = map(int, subprocess.run([sys.executable, "-c", THREAD_CHILD], check=True, capture_output=True,
                                                 text=True).stdout.split())
    assert (thread, main) == (min(19, base + 4), base)
