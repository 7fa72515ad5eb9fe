"""Checks made before any work, shared by the run and ``dry_run``: a dry run that passes means
the run will start.

* :func:`check_settings`: combinations of settings that cannot work (a crop layer left with no
  prompt points, more points per side than a chip has pixels). Every
  :class:`~raysam.config.RunConfig` runs it on construction.
* :func:`check_paths`: paths that are files where a directory is expected.
* The Ray side: :func:`ray_address` resolves ``ray.address`` and checks, within
  ``ray.timeout_s``, that a Ray cluster answers there; :func:`unmet_demand` compares what the
  run needs at once (its SAM actors, one chip read and one back-half task beside them, a chip's
  mask generation in memory) with what each node has, for the local instance a run would start
  (:func:`local_capacity`, without starting it) or a connected cluster
  (:func:`connected_capacity`); with ``ray.autoscale_wait_s`` a cluster gets that long to grow
  (:func:`wait_for_capacity`).
* :func:`check_bands`: every configured band is an asset of every selected item.

The output root is checked by :meth:`raysam.storage.root.OutputRoot.check_reachable` and
:meth:`~raysam.storage.root.OutputRoot.check_writable`, both bounded by ``output.timeout_s``.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from raysam.errors import ConfigError, DataError
from raysam.grid import DEFAULT_CHIP_SIZE as CHIP_PX
from raysam.items import canonical_band

if TYPE_CHECKING:
    from raysam.config import RayConfig, RunConfig
    from raysam.plan import RunPlan
    from raysam.sam.params import AmgParams

log = logging.getLogger(__name__)

# Memory a chip-read task reserves: ~390 MB measured (Ray Data's issue detector, demo region), rounded
# up: the worker's baseline plus 4 bands of 1024 x 1024 (DN, reflectance float32, masks) and GDAL's
# warp buffers; reserved so that many concurrent reads cannot oversubscribe a node's memory.
READ_TASK_MEMORY_BYTES = 512 * 1024**2
LOW_RES_PX = 256  # SAM's low-resolution mask logits are 256 x 256 per candidate
AUTOSCALE_POLL_S = 2.0


# ---------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------
def check_settings(cfg: RunConfig) -> None:
    """Refuse setting combinations that cannot work, each in one line naming the settings.

    Raises:
        ConfigError: a crop layer with no prompt points, or more points per side than a chip
            has pixels.
    """
    amg = cfg.amg
    if amg.points_per_side is None:
        return
    if amg.points_per_side > CHIP_PX:
        raise ConfigError(f"sam.points_per_side={amg.points_per_side} asks for more prompt points per side than a "
                          f"chip has pixels ({CHIP_PX}): use at most {CHIP_PX} (SAM's default is 32, the seed's 16)")
    for layer in range(1, amg.n_crop_layers + 1):
        per_side = int(amg.points_per_side / amg.crop_n_points_downscale_factor**layer)
        if per_side < 1:
            raise ConfigError(
                f"sam.n_crop_layers={amg.n_crop_layers} with sam.crop_n_points_downscale_factor="
                f"{amg.crop_n_points_downscale_factor} leaves crop layer {layer} with no prompt points "
                f"(sam.points_per_side={amg.points_per_side} / {amg.crop_n_points_downscale_factor}**{layer} < 1): "
                "lower the factor or n_crop_layers, or raise points_per_side")


def chip_memory_bytes(amg: AmgParams, chip_px: int = CHIP_PX) -> int:
    """Rough peak memory of one chip's mask generation beyond the model: the point grids plus
    one batch of decoded candidates (low-resolution logits and, at worst, a full-chip upsampled
    mask each)."""
    if amg.point_grids is not None:
        grid_points = sum(len(g) for g in amg.point_grids)
    else:
        grid_points = sum(int(amg.points_per_side / amg.crop_n_points_downscale_factor**i) ** 2
                          for i in range(amg.n_crop_layers + 1))
    candidates = amg.points_per_batch * (3 if amg.multimask else 1)
    return grid_points * 2 * 8 + candidates * (LOW_RES_PX**2 + chip_px**2) * 4


def check_paths(cfg: RunConfig) -> None:
    """Refuse files where the run needs a directory (the model, the demo catalog's root).

    Raises:
        ConfigError: naming the setting and the file.
    """
    demo_root = None if cfg.demo_catalog is None else str(Path(cfg.demo_catalog).parent)
    for setting, value in (("model.path", cfg.model.path), ("stac.demo_root", demo_root)):
        if value is None:
            continue
        path = Path(value)
        while not path.exists() and path != path.parent:
            path = path.parent
        if path.exists() and not path.is_dir():
            where = "is a file" if str(path) == value else f"is under {path}, which is a file"
            raise ConfigError(f"{setting}={value!r} {where}, not a directory: point it at a directory")


# ---------------------------------------------------------------------------------------------
# Ray: where, and whether the run fits
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Node:
    """What one Ray node offers: CPUs, GPUs and Ray's ``memory`` resource (None: not known)."""

    cpus: float
    gpus: float
    memory_bytes: float | None = None


@dataclass(frozen=True)
class Capacity:
    """The nodes a run would get, and how to name them in a message."""

    nodes: tuple[Node, ...]
    where: str

    def describe(self) -> str:
        cpus = sum(n.cpus for n in self.nodes)
        gpus = sum(n.gpus for n in self.nodes)
        nodes = f"{len(self.nodes)} node(s): " if len(self.nodes) != 1 else ""
        return f"{self.where} ({nodes}{cpus:g} CPUs, {gpus:g} GPUs)"


def local_capacity(cfg: RunConfig) -> Capacity:
    """What the local Ray instance a run starts will have, computed as Ray does, without starting it."""
    import psutil

    try:
        from ray._private.resource_and_label_spec import ResourceAndLabelSpec

        store = int(cfg.ray.object_store_gb * 1e9) if cfg.ray.object_store_gb else None
        spec = ResourceAndLabelSpec(object_store_memory=store).resolve(is_head=True, node_ip_address="127.0.0.1")
        node = Node(float(spec.num_cpus), float(spec.num_gpus), float(spec.memory))
    except Exception:  # noqa: BLE001 - a private Ray API: fall back to what the OS says
        import os

        node = Node(float(os.cpu_count() or 1), 0.0, None)
    if cfg.ray.object_store_gb and cfg.ray.object_store_gb * 1e9 > psutil.virtual_memory().total:
        raise ConfigError(f"ray.object_store_gb={cfg.ray.object_store_gb:g} is more than this machine's memory "
                          f"({psutil.virtual_memory().total / 1e9:.1f} GB): lower it, or null to let Ray size it")
    return Capacity((node,), "the local Ray instance this run starts")


def connected_capacity(where: str = "the connected Ray cluster") -> Capacity:
    """The alive nodes of the Ray cluster this process is connected to."""
    import ray

    nodes = []
    for info in ray.nodes():
        if info.get("Alive"):
            res = info.get("Resources", {})
            nodes.append(Node(float(res.get("CPU", 0)), float(res.get("GPU", 0)), res.get("memory")))
    return Capacity(tuple(nodes), where)


def _fits(free: list[float | None], need: tuple[float, float, float]) -> bool:
    return (free[0] >= need[0] - 1e-9 and free[1] >= need[1] - 1e-9
            and (free[2] is None or free[2] >= need[2]))


def _take(free: list[float | None], need: tuple[float, float, float]) -> None:
    free[0] -= need[0]
    free[1] -= need[1]
    if free[2] is not None:
        free[2] -= need[2]


def unmet_demand(cfg: RunConfig, capacity: Capacity, model_bytes: int = 0) -> str | None:
    """Why the run cannot start on ``capacity``, in one line, or None when it fits.

    It fits when every SAM actor (``ray.cpus_per_actor``, ``ray.gpus_per_actor``) has a node,
    placed first fit, and beside them one chip read (``ray.read_cpus`` and
    :data:`READ_TASK_MEMORY_BYTES`) and one back-half task (``ray.sink_cpus``) each still
    find room: with less, Ray Data waits for ever for resources. A SAM actor's memory (the
    model plus :func:`chip_memory_bytes`) must also fit in a node's memory.

    Args:
        cfg: the run config.
        capacity: the nodes.
        model_bytes: the model's file sizes (encoder + decoder), if known.
    """
    nodes = capacity.nodes
    where = capacity.describe()
    if not nodes:
        return f"{where} has no alive node: start the cluster's nodes, or use a local instance (ray.address=null)"
    r = cfg.ray.resolved(max(n.cpus for n in nodes))
    actor = (r.cpus_per_actor, r.gpus_per_actor, 0.0)
    read = (r.read_cpus, 0.0, float(READ_TASK_MEMORY_BYTES))
    sink = (r.sink_cpus, 0.0, 0.0)
    if r.gpus_per_actor > 0 and not any(n.gpus for n in nodes):
        return (f"ray.gpus_per_actor={r.gpus_per_actor:g}, but {where} has no GPU: set ray.gpus_per_actor=0 to run "
                "SAM on CPUs, or run on a cluster with GPU nodes")
    if cfg.device == "cuda" and not any(n.gpus for n in nodes):
        return (f"device=cuda, but {where} has no GPU: use device=auto or device=cpu, or run on a cluster with "
                "GPU nodes (and ray.gpus_per_actor=1)")
    largest = max(nodes, key=lambda n: (n.gpus, n.cpus))
    for what, need in (("a SAM actor", actor), ("a chip read", read), ("a back-half task", sink)):
        if not any(_fits([n.cpus, n.gpus, n.memory_bytes], need) for n in nodes):
            return (f"{what} needs {_bundle(need)} ({_settings(what)}), more than any node of {where} has "
                    f"(largest: {largest.cpus:g} CPUs, {largest.gpus:g} GPUs): lower {_settings(what)}")
    need_mem = model_bytes * 2 + chip_memory_bytes(cfg.amg)
    biggest = max((n.memory_bytes for n in nodes if n.memory_bytes), default=None)
    if biggest is not None and need_mem > biggest:
        return (f"one chip's mask generation needs about {need_mem / 1e9:.1f} GB (sam.points_per_batch="
                f"{cfg.amg.points_per_batch} prompts x {3 if cfg.amg.multimask else 1} candidate masks of "
                f"{CHIP_PX}x{CHIP_PX}, plus the point grids and the model), more than the {biggest / 1e9:.1f} GB of "
                f"the largest node of {where}: lower sam.points_per_batch or sam.points_per_side")
    free = [[n.cpus, n.gpus, n.memory_bytes] for n in nodes]
    for placed in range(r.sam_actors):
        spot = next((f for f in free if _fits(f, actor)), None)
        if spot is None:
            return _too_many(r, where, placed)
        _take(spot, actor)
    for what, need in (("a chip read", read), ("a back-half task", sink)):
        if not any(_fits(f, need) for f in free):
            return (f"ray.sam_actors={r.sam_actors} SAM actor(s) of {_bundle(actor)} leave no room beside them for "
                    f"{what} ({_bundle(need)}) on {where}, so the run would wait for ever: lower ray.sam_actors, "
                    f"ray.cpus_per_actor or {_settings(what)}")
    return None


def _too_many(r: RayConfig, where: str, placed: int) -> str:
    return (f"ray.sam_actors={r.sam_actors} SAM actors of {_bundle((r.cpus_per_actor, r.gpus_per_actor, 0.0))} "
            f"each do not fit on {where} (only {placed} do), so the run would wait for ever: lower "
            "ray.sam_actors or ray.cpus_per_actor/ray.gpus_per_actor")


def _bundle(need: tuple[float, float, float]) -> str:
    parts = [f"{need[0]:g} CPU(s)"]
    if need[1]:
        parts.append(f"{need[1]:g} GPU(s)")
    if need[2]:
        parts.append(f"{need[2] / 1024**2:.0f} MiB")
    return " + ".join(parts)


def _settings(what: str) -> str:
    return {"a SAM actor": "ray.cpus_per_actor/ray.gpus_per_actor", "a chip read": "ray.read_cpus",
            "a back-half task": "ray.sink_cpus"}[what]


def ray_address(cfg: RunConfig) -> str | None:
    """The Ray cluster address the run connects to (None: it starts a local instance), checked
    to answer as a Ray cluster within ``ray.timeout_s``.

    ``ray.address`` null means the cluster of ``RAY_ADDRESS`` (``ray job submit``) or a local
    instance; ``auto`` means ``RAY_ADDRESS`` or a cluster started on this machine with
    ``ray start``; ``ray://host:port`` is a Ray Client server.

    Raises:
        ConfigError: no cluster found for ``auto``, a malformed address, an unknown host, a
            refused connection, or no answer within ``ray.timeout_s``.
    """
    import os

    address = cfg.ray.address or os.environ.get("RAY_ADDRESS") or None
    if address in (None, "local"):
        return None
    named = f"ray.address={cfg.ray.address}" if cfg.ray.address else f"RAY_ADDRESS={address}"
    if address.startswith("ray://"):
        host_port = address[len("ray://"):]
    else:
        from ray._private.services import canonicalize_bootstrap_address_or_die

        try:
            host_port = canonicalize_bootstrap_address_or_die(address)
        except (ConnectionError, ValueError) as err:
            raise ConfigError(f"{named}: {_first_line(err)} Start a cluster (ray start --head) or use a "
                              "local instance (ray=local)") from None
    host, _, port = host_port.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"{named} is not host:port (e.g. 10.0.0.5:6379, auto, or ray://head:10001)")
    check_answers(named, host.strip("[]"), int(port), cfg.ray.timeout_s)
    return address


def check_answers(named: str, host: str, port: int, timeout_s: float) -> None:
    """A TCP connection, then a gRPC (HTTP/2) handshake, to ``host:port`` within ``timeout_s``:
    a Ray cluster's GCS or client server answers both; a wrong port or a dead host does not.

    Raises:
        ConfigError: unknown host, refused, or no answer in time.
    """
    import grpc

    from raysam.deadline import bounded

    fix = "check the address and that the cluster is up, or raise ray.timeout_s"
    deadline = time.monotonic() + timeout_s
    no_answer = f"{named}: no answer from {host}:{port} within {timeout_s:g} s (ray.timeout_s): {fix}"
    try:  # bounded as a whole: a host name's lookup has no timeout of its own
        bounded(lambda: socket.create_connection((host, port), timeout=timeout_s).close(), timeout_s,
                lambda: ConfigError(no_answer))
    except socket.gaierror:
        raise ConfigError(f"{named}: unknown host {host!r}: {fix}") from None
    except TimeoutError:
        raise ConfigError(no_answer) from None
    except OSError as err:
        raise ConfigError(f"{named}: cannot connect to {host}:{port} ({err.strerror or err}): {fix}") from None
    channel = grpc.insecure_channel(f"{host}:{port}")
    try:
        grpc.channel_ready_future(channel).result(timeout=max(0.1, deadline - time.monotonic()))
    except grpc.FutureTimeoutError:
        raise ConfigError(f"{named}: {host}:{port} accepts connections but does not answer as a Ray cluster "
                          f"within {timeout_s:g} s (ray.timeout_s): {fix}") from None
    finally:
        channel.close()


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def wait_for_capacity(cfg: RunConfig, model_bytes: int = 0) -> None:
    """Ask the cluster's autoscaler for the run's actors and tasks, and wait up to
    ``ray.autoscale_wait_s`` until the cluster fits them.

    Raises:
        ConfigError: the cluster still does not fit after the wait.
    """
    from ray.autoscaler.sdk import request_resources

    r = cfg.ray
    actor = {"CPU": r.cpus_per_actor or 1.0, **({"GPU": r.gpus_per_actor} if r.gpus_per_actor else {})}
    request_resources(bundles=[actor] * r.sam_actors + [{"CPU": max(r.read_cpus, r.sink_cpus)}])
    deadline = time.monotonic() + (r.autoscale_wait_s or 0.0)
    problem = unmet_demand(cfg, connected_capacity(), model_bytes)
    if problem:
        log.info("the cluster does not fit the run yet (%s); waiting up to %g s for the autoscaler",
                 problem, r.autoscale_wait_s)
    while problem and time.monotonic() < deadline:
        time.sleep(AUTOSCALE_POLL_S)
        problem = unmet_demand(cfg, connected_capacity(), model_bytes)
    if problem:
        raise ConfigError(f"{problem} (after waiting ray.autoscale_wait_s={r.autoscale_wait_s:g} s for the autoscaler)")


# ---------------------------------------------------------------------------------------------
# Bands
# ---------------------------------------------------------------------------------------------
def check_bands(cfg: RunConfig, plan: RunPlan) -> None:
    """Every band the run reads (the chip's RGB and SCL; ``output.s2_bands`` when the
    ``s2_raster`` sink is on) must be an asset of every selected item.

    Raises:
        DataError: naming the setting, the band, the item and the bands it has.
    """
    from raysam.plan import SCL_BAND

    wanted: list[tuple[str, Sequence[str]]] = [("sam.band_names", cfg.chip.scaling.band_names),
                                               ("the cloud mask (SCL)", (SCL_BAND,))]
    if "s2_raster" in cfg.output.sinks:
        wanted.append(("output.s2_bands", cfg.output.s2_bands))
    for g in plan.todo:
        for item in g.group.items:
            for setting, bands in wanted:
                missing = [b for b in bands if canonical_band(b) not in item.bands]
                if missing:
                    raise DataError(
                        f"{setting} needs {', '.join(missing)}, but item {item.id} of date group {g.group.id} has no "
                        f"such asset (it has {', '.join(sorted(item.bands))}): choose among those")


def model_bytes(manifest: dict[str, Any]) -> int:
    """The model's encoder and decoder file sizes, from its manifest."""
    return sum(int(manifest.get(graph, {}).get("bytes") or 0) for graph in ("encoder", "decoder"))
