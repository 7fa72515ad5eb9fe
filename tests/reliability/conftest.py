"""Fixtures for the reliability tests: a multi-node Ray cluster on this machine, demo run configs.

    demo_config()     a validated RunConfig for the demo region on the session's catalog.
    gpu_cluster       module: a ``ray.cluster_utils.Cluster`` whose head has no CPUs and whose one
                      worker node declares 2 CPUs and 1 logical GPU, so every task and the SAM
                      actor (``ray.gpus_per_actor=1``) run on worker nodes that can be lost.
                      ``ray`` is connected to it for the module.
    s3_server         module: a real S3-compatible server (moto) on a free localhost port, with
                      credentials in this process's environment; yields ``uri(prefix)``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from raysam.config import RunConfig
from raysam.hydra_config import to_run_config
from raysam.run import CONF_DIR

WORKER_CPUS = 2
WORKER_GPUS = 1  # logical: onnxruntime stays on the CPU (device=cpu)
OBJECT_STORE_BYTES = 200 * 1024**2  # per node; a demo run holds a few MB of chips at a time
BUCKET = "raysam-test"


def demo_config(demo_catalog, out_root: Path, *overrides: str) -> RunConfig:
    """A validated RunConfig for the demo region and demo model on the session's catalog."""
    base = [
        "region=demo", "model=demo", f"stac.demo_root={demo_catalog.root.parent}",
        f"model.path={demo_catalog.root.parent / 'models' / 'demo'}", f"output.root='{out_root}'",
    ]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return to_run_config(compose("config", overrides=[*base, *overrides]))


@dataclass
class GpuCluster:
    """A local multi-node cluster: a CPU-less head plus replaceable worker nodes with a GPU."""

    cluster: object  # ray.cluster_utils.Cluster
    workers: list = field(default_factory=list)

    def add_worker(self) -> object:
        """Start a fresh worker node (2 CPUs, 1 logical GPU) and wait until it has joined."""
        node = self.cluster.add_node(num_cpus=WORKER_CPUS, num_gpus=WORKER_GPUS,
                                     object_store_memory=OBJECT_STORE_BYTES)
        self.cluster.wait_for_nodes()
        self.workers.append(node)
        return node

    def remove_worker(self, node: object) -> None:
        """Kill a worker node at once (raylet and all its workers), as a preemption does."""
        self.cluster.remove_node(node, allow_graceful=False)
        self.workers.remove(node)


@pytest.fixture(scope="module")
def gpu_cluster():
    """A head with ``num_cpus=0`` and one GPU worker node, ``ray`` connected; torn down after."""
    import ray
    from ray.cluster_utils import Cluster

    from raysam.pipeline import SAM_CHIP_DELAY_ENV

    saved = os.environ.get(SAM_CHIP_DELAY_ENV)
    # Nodes (and so their workers) inherit this environment: each SAM call takes >= 0.4 s, so
    # a fault injected after a few chips always lands while most of the region is still to do.
    os.environ[SAM_CHIP_DELAY_ENV] = "0.4"
    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "object_store_memory": OBJECT_STORE_BYTES})
    gpu = GpuCluster(cluster)
    try:
        gpu.add_worker()
        ray.init(address=cluster.address, log_to_driver=False)
        yield gpu
    finally:
        ray.shutdown()
        cluster.shutdown()
        if saved is None:
            os.environ.pop(SAM_CHIP_DELAY_ENV, None)
        else:
            os.environ[SAM_CHIP_DELAY_ENV] = saved


def wait_for(predicate, timeout_s: float, what: str, poll_s: float = 0.05):
    """Poll ``predicate()`` until it returns a truthy value; fail the test after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}")


@pytest.fixture(scope="module")
def s3_server():
    """A moto S3 server on a free localhost port, with credentials in this process's environment
    (Ray workers started from here inherit them). Yields ``uri(prefix)``."""
    from raysam.demo.serve import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "moto server did not start"
                time.sleep(0.1)
        yield lambda prefix: (f"s3://{BUCKET}/{prefix}?endpoint_override=127.0.0.1:{port}&scheme=http"
                              "&allow_bucket_creation=true")
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
