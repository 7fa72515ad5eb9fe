"""The preflight's pure parts on known capacities, and the Ray side against real Ray instances.

What a run needs at once: its SAM actors, and beside them one chip read and one back-half task.
The bad-input table (tests/reliability/test_bad_inputs.py) drives every check end to end through
the command line; here each rule is checked on capacities whose answer is known by hand.
"""

from __future__ import annotations

import threading
import time

import pytest

from raysam.config import RayConfig, RunConfig
from raysam.errors import ConfigError
from raysam.preflight import Capacity, Node, chip_memory_bytes, unmet_demand, wait_for_capacity
from raysam.region import RegionSpec
from raysam.sam.params import AmgParams
from tests.helpers import start_local_ray

GIB = 1024**3
REGION = RegionSpec("r", "0,0,1,1", ("2024-06-01", "2024-06-30"))


WHOLE_CPUS = {"cpus_per_actor": 1.0, "read_cpus": 1.0, "sink_cpus": 1.0}  # what ray=cluster-like settings give


def _cfg(**ray: object) -> RunConfig:
    return RunConfig(region=REGION, ray=RayConfig(**{**WHOLE_CPUS, **ray}))


def _one(cpus: float, gpus: float = 0.0, memory: float | None = 16 * GIB) -> Capacity:
    return Capacity((Node(cpus, gpus, memory),), "the test node")


@pytest.mark.parametrize(("ray", "capacity", "problem"), [
    ({}, _one(2), None),  # 1 actor + 1 read on 2 CPUs
    ({"cpus_per_actor": None, "read_cpus": 0.25, "sink_cpus": 0.25}, _one(2), None),  # ray=local: 1.25 + 0.25 + 2 x 0.25
    ({"cpus_per_actor": None, "read_cpus": 0.25, "sink_cpus": 0.25, "sam_actors": 2}, _one(2), None),  # 0.625 each
    ({"sam_actors": 2}, _one(2), "leave no room beside them for a chip read"),
    ({"sam_actors": 2, "cpus_per_actor": 0.5}, _one(2), None),  # 2 x 0.5 + 1 read = 2
    ({"sam_actors": 2, "read_cpus": 0.5, "sink_cpus": 0.5, "cpus_per_actor": 0.75}, _one(2), None),
    ({"sink_cpus": 2}, _one(2), "leave no room beside them for a back-half task"),
    ({"gpus_per_actor": 1}, _one(2), "ray.gpus_per_actor=1, but the test node (2 CPUs, 0 GPUs) has no GPU"),
    ({"cpus_per_actor": 3}, Capacity((Node(2, 0), Node(2, 0)), "two nodes"),
     "a SAM actor needs 3 CPU(s) (ray.cpus_per_actor/ray.gpus_per_actor), more than any node"),
    ({"read_cpus": 4}, _one(2), "a chip read needs 4 CPU(s) + 512 MiB (ray.read_cpus)"),
    ({"gpus_per_actor": 1}, Capacity((Node(0, 0), Node(2, 1)), "a CPU-less head and a GPU node"), None),
    ({"gpus_per_actor": 1, "sam_actors": 2}, Capacity((Node(0, 0), Node(2, 1)), "one GPU node"),
     "ray.sam_actors=2 SAM actors of 1 CPU(s) + 1 GPU(s) each do not fit on one GPU node (2 node(s): 2 CPUs, "
     "1 GPUs) (only 1 do)"),
    ({"gpus_per_actor": 1, "sam_actors": 2}, Capacity((Node(0, 0), Node(2, 1), Node(2, 1)), "two GPU nodes"), None),
    ({}, _one(2, memory=256 * 1024**2), "a chip read needs 1 CPU(s) + 512 MiB"),  # Ray's memory resource
])
def test_what_a_run_needs_at_once_against_known_nodes(ray, capacity, problem):
    got = unmet_demand(_cfg(**ray), capacity)
    assert (got is None) if problem is None else (got is not None and problem in got), got


def test_device_cuda_needs_a_gpu_somewhere():
    cfg = RunConfig(region=REGION, device="cuda")
    assert "device=cuda, but the test node" in unmet_demand(cfg, _one(4))
    assert unmet_demand(cfg, Capacity((Node(4, 0), Node(4, 1)), "a GPU node")) is None


def test_chip_memory_counts_the_grids_and_one_batch_of_candidates():
    # 16 x 16 points of 2 float64; 16 prompts x 3 candidates x (256^2 low-res + 1024^2 masks) float32
    assert chip_memory_bytes(AmgParams()) == 16 * 16 * 16 + 16 * 3 * (256**2 + 1024**2) * 4
    # a crop layer of 2x downscaled points, single-mask decoding
    params = AmgParams(points_per_side=8, n_crop_layers=1, crop_n_points_downscale_factor=2, multimask=False)
    assert chip_memory_bytes(params) == (64 + 16) * 16 + 16 * (256**2 + 1024**2) * 4


def test_a_batch_beyond_the_largest_node_is_refused_before_any_work():
    cfg = RunConfig(region=REGION, amg=AmgParams(points_per_batch=4096))  # ~55 GB of candidates
    problem = unmet_demand(cfg, _one(8, memory=32 * GIB))
    assert problem.startswith("one chip's mask generation needs about 54.8 GB") and "sam.points_per_batch" in problem
    assert unmet_demand(cfg, _one(8, memory=None)) is None  # unknown memory: not judged


def test_a_crop_layer_without_points_is_refused_when_the_config_is_built():
    with pytest.raises(ConfigError, match="leaves crop layer 2 with no prompt points"):
        RunConfig(region=REGION, amg=AmgParams(points_per_side=8, n_crop_layers=2, crop_n_points_downscale_factor=4))
    RunConfig(region=REGION, amg=AmgParams(points_per_side=16, n_crop_layers=2, crop_n_points_downscale_factor=4))


@pytest.mark.slow
def test_the_local_capacity_is_what_a_local_ray_instance_gets():
    """Sized without starting Ray, it matches the instance ``ray.init`` then starts."""
    import ray

    from raysam.preflight import connected_capacity, local_capacity

    predicted = local_capacity(_cfg())
    assert not ray.is_initialized()
    start_local_ray(address="local", include_dashboard=False, log_to_driver=False)
    try:
        (node,) = connected_capacity().nodes
    finally:
        ray.shutdown()
    (want,) = predicted.nodes
    assert (node.cpus, node.gpus) == (want.cpus, want.gpus)
    assert node.memory_bytes == pytest.approx(want.memory_bytes, rel=0.1)


def _waited(cfg: RunConfig) -> float:
    t0 = time.monotonic()
    wait_for_capacity(cfg)
    return time.monotonic() - t0


@pytest.mark.slow
def test_an_autoscaling_cluster_gets_its_bounded_wait():
    """A cluster too small for the run grows (a node joins, as an autoscaler would add one) while
    the run waits; without a node joining, the wait ends in one line."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        with pytest.raises(ConfigError, match=r"after waiting ray.autoscale_wait_s=3 s for the autoscaler"):
            wait_for_capacity(_cfg(autoscale_wait_s=3))
        outcome: list = []
        waiter = threading.Thread(target=lambda: outcome.append(_waited(_cfg(autoscale_wait_s=120))))
        waiter.start()
        time.sleep(2.0)
        assert waiter.is_alive()  # still waiting for room
        cluster.add_node(num_cpus=2)  # in the main thread: a Ray node sets signal handlers
        waiter.join(timeout=120)
        assert outcome and outcome[0] < 120, outcome
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_auto_without_a_running_cluster_is_named_in_one_line(monkeypatch):
    import os
    from pathlib import Path

    from ray._private.services import find_gcs_addresses

    from raysam.preflight import ray_address

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    if find_gcs_addresses() or Path("/tmp/ray/ray_current_cluster").exists():
        pytest.skip("a Ray cluster runs on this machine (ray.address=auto would find it)")
    with pytest.raises(ConfigError, match=r"^ray.address=auto: Could not find any running Ray instance.*ray=local"):
        ray_address(_cfg(address="auto"))
    assert os.environ.get("RAY_ADDRESS") is None
