"""The local Ray instance a run starts (raysam.driver.init_ray)."""

from __future__ import annotations

import time

import ray

from raysam.config import RayConfig
from raysam.driver import IDLE_WORKER_KEEP_MS, init_ray, shutdown_ray


@ray.remote(num_cpus=0)
class _Idle:
    def ping(self) -> int:
        return 1


@ray.remote(num_cpus=0.25)
def _pid() -> int:
    import os

    return os.getpid()


def test_the_local_instance_keeps_a_task_worker_between_tasks():
    """Ray keeps an idle worker only while the node has a free CPU for it, and kills the others a
    second after their task; a run's SAM actors hold nearly every CPU of a small machine. The local
    instance a run starts keeps an idle task worker anyway, so the next chip read or sink task
    reuses its process instead of starting (and importing GDAL, Arrow, raysam into) a new one."""
    assert not ray.is_initialized()
    assert IDLE_WORKER_KEEP_MS / 1000 > 3.0  # longer than the idle spell below
    init_ray(RayConfig())
    try:
        cpus = ray.cluster_resources()["CPU"]
        sam_like = _Idle.options(num_cpus=cpus - 0.5).remote()  # as the SAM actors on 2 CPUs: 1.5
        ray.get(sam_like.ping.remote())
        first = ray.get(_pid.remote())
        time.sleep(3.0)  # Ray's default kills such an idle worker after 1 s
        assert ray.get(_pid.remote()) == first
    finally:
        shutdown_ray()
