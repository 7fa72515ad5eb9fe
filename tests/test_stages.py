"""The Ray stages' contracts: SAM actors use the CPUs they reserve; no task argument holds the key.

* ONNX Runtime in a SAM actor gets ``ceil(ray.cpus_per_actor)`` threads (read back from the
  sessions), not every core of the node: several CPU actors on one node must not oversubscribe it.
* The Planetary Computer key never travels in a pickled task argument (Ray can spill those to
  disk): the front half's stage arguments (built by :func:`raysam.pipeline.chip_dataset`) and the
  back half's (:class:`raysam.layout.GroupSpec`, the key-free signer spec) are pickled as Ray
  pickles them and searched for a planted key.
"""

from __future__ import annotations

import math
import uuid
from dataclasses import replace

import pytest
import ray
import ray.cloudpickle as cloudpickle

from raysam.config import RayConfig
from raysam.layout import GroupSpec
from raysam.model_source import ModelSource
from raysam.pipeline import SamStage, chip_dataset, sam_threads
from raysam.plan import chip_bands
from raysam.runstats import STATS_ACTOR, RunStats
from raysam.signing import signer_spec
from tests.reliability.conftest import demo_config


def _session_threads(stage: SamStage) -> dict[str, int]:
    model = stage.model
    return {"encoder": model.encoder.get_session_options().intra_op_num_threads,
            "decoder": model.decoder.get_session_options().intra_op_num_threads * model.decode_workers}


@pytest.mark.slow
@pytest.mark.parametrize("cpus_per_actor", [1.0, 1.5])
def test_a_sam_actor_runs_onnx_runtime_on_the_cpus_it_reserves(demo_catalog, ray_local, cpus_per_actor):
    from raysam.demo.model import build_demo_model

    model_dir = demo_catalog.root.parent / "models" / "demo"
    if not (model_dir / "manifest.json").exists():
        build_demo_model(model_dir)
    ray_cfg = RayConfig(cpus_per_actor=cpus_per_actor)
    stats = RunStats.options(name=STATS_ACTOR, get_if_exists=True).remote()
    try:
        actor = ray.remote(SamStage).options(num_cpus=cpus_per_actor).remote(
            ModelSource.from_path(model_dir, ship_bytes=False), {"points_per_side": 4}, "cpu", {},
            sam_threads(ray_cfg))
        threads = ray.get(actor.__ray_call__.remote(_session_threads))
    finally:
        ray.kill(stats)
    want = math.ceil(cpus_per_actor)
    assert threads == {"encoder": want, "decoder": want}, threads
    assert ray.cluster_resources()["CPU"] == 2  # below the node's cores, so the default would differ


def _pickled_arguments(ds) -> bytes:
    """Everything Ray pickles for the dataset's map stages: functions' kwargs and constructors' args."""
    blobs, op = [], ds._logical_plan.dag
    while op is not None:
        for attr in ("fn_kwargs", "fn_constructor_args", "fn_constructor_kwargs", "_fn_kwargs",
                     "_fn_constructor_args", "_fn_constructor_kwargs"):
            if getattr(op, attr, None):
                blobs.append(cloudpickle.dumps(getattr(op, attr)))
        op = op.input_dependencies[0] if op.input_dependencies else None
    assert len(blobs) >= 2, "expected the read and SAM stages' arguments"
    return b"".join(blobs)


def test_the_stac_key_is_in_no_pickled_task_argument(ray_local, demo_catalog, tmp_path, monkeypatch):
    from raysam.driver import prepare

    key = f"PLANTED-{uuid.uuid4().hex}"
    monkeypatch.setenv("PC_SDK_SUBSCRIPTION_KEY", key)
    cfg = demo_config(demo_catalog, tmp_path / "out", "sam.points_per_side=4")
    cfg = replace(cfg, stac=replace(cfg.stac, pc_key=key), ray=cfg.ray.resolved(2.0))
    assert key.encode() in cloudpickle.dumps(cfg.stac)  # the config does hold it (the driver needs it)
    prepared = prepare(cfg)
    specs = {g.group.id: GroupSpec(g.group, prepared.root, g.fingerprint, g.out_dir, g.out_dir, g.work_dir,
                                   chip_bands(cfg), cfg.chip.spatial_overlap) for g in prepared.plan.groups}
    ds = chip_dataset(specs, cfg, {gid: cfg.chip.scaling for gid in specs},
                      ModelSource.from_path(prepared.model_dir, ship_bytes=False), dict.fromkeys(specs, False))
    front = _pickled_arguments(ds)
    back = cloudpickle.dumps((list(specs.values()), signer_spec(cfg.stac), cfg.chip.scaling, cfg.network, cfg.merge))
    assert key.encode() not in front and key.encode() not in back
