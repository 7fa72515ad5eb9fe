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


def test_stopping_the_local_instance_ends_every_process_it_started():
    """shutdown_ray (which kills the autoscaler monitor itself before Ray's own shutdown) leaves
    no process of the instance init_ray started: daemons, their workers and the monitor."""
    import psutil

    assert not ray.is_initialized()
    init_ray(RayConfig())
    processes = ray._private.worker._global_node.all_processes
    assert {"raylet", "gcs_server", "monitor"} <= set(processes)
    infos = [info for group in processes.values() for info in group]
    family = [psutil.Process(info.process.pid) for info in infos]
    family += [child for p in family for child in p.children(recursive=True)]
    shutdown_ray()
    _gone, alive = psutil.wait_procs(family, timeout=10)
    assert not alive, [p.cmdline()[:2] for p in alive]


def test_ray_data_actors_start_with_the_instance_and_serve_the_run():
    """init_ray asks for Ray Data's cluster-wide actors at once (start_ray_data_actors), so their
    processes start while the driver sets up; the dataset that runs next uses those same actors.
    If a Ray upgrade renames them, this fails: start_ray_data_actors then creates nothing useful."""
    from ray.data._internal.stats import STATS_ACTOR_NAME, STATS_ACTOR_NAMESPACE

    named = {"ActorLocationTracker": "ActorLocationTracker", "AutoscalingCoordinator": "AutoscalingCoordinator",
             STATS_ACTOR_NAME: STATS_ACTOR_NAMESPACE}

    def actor_ids() -> dict[str, str]:
        return {name: ray.get_actor(name, namespace=ns)._actor_id.hex() for name, ns in named.items()}

    assert not ray.is_initialized()
    init_ray(RayConfig())
    try:
        before = actor_ids()  # raises ValueError for an actor that was not created
        assert ray.data.range(8).map_batches(lambda batch: batch).count() == 8
        assert actor_ids() == before
    finally:
        shutdown_ray()
